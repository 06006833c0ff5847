"""Residual-stream matching: a student with learned maps d_S -> d_T, and the FitNets term (`--loss hidden`).

FitNets (Romero et al. 2015) trains a narrow student's "guided" layer to predict a wide teacher's
"hint" layer through a learned regressor. kdtool's version: at each layer L of --hidden-layers
(students keep the teacher's depth, so layer L of both is hidden_states[L], the output of block L),
an affine map r_L: R^{d_S} -> R^{d_T} is trained with the student, and per real token

    hidden = mean over L of ||r_L(n(h_S^L)) - n(h_T^L)||^2 / d_T,    n(x) = x / rms(x)

is added to the KL as --hidden-weight x hidden (rms(x) = sqrt(mean_d x_d^2): both streams are
compared at unit RMS per token, so 0 = a perfect copy and 1 = predicting zero). Why normalise:
the scales differ by orders of magnitude (SmolLM2's residual norms run in the hundreds and the
first token's is far larger than the rest; a fresh student's are ~0.02 x sqrt(d_S)), so a plain
MSE would need a weight picked per model, be ruled by a few tokens, and leave the map to grow its
weights by 10^4 at Adam's step size before the term meant anything. What n() drops, each token's
overall norm, is what the next block's RMSNorm/LayerNorm drops too. FitNets' own loss is the
plain 1/2 ||r(h_S) - h_T||^2; the difference is this normalisation only.

The maps (`Student.maps`) train with the student (same AdamW, same DDP wrapper, so their gradients
are averaged across ranks) and are saved beside it: OUTPUT/width{W}-hidden/residual_map.safetensors
(docs/formats.md), applied to n(h_S). kdtool/distill/features.py reuses the same maps for
`--loss features`, at the teacher's per-token RMS.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdtool import formats

MAP_FILE = "residual_map.safetensors"
MAP_KIND = "kdtool.distill.residual_map"


class Student(nn.Module):
    """A student LM and its learned maps r_L (one per matched layer; none for the output-only losses).

    forward(input_ids, attention_mask) -> (logits [b, S, V], {L: r_L(hidden_states[L]) [b, S, d_T]}).
    With no maps it runs exactly the plain LM forward (the kl students of today, bit for bit).
    """

    def __init__(self, lm: nn.Module, layers: list[int], d_teacher: int):
        super().__init__()
        self.lm = lm
        self.maps = nn.ModuleDict()
        width = int(lm.config.hidden_size)
        for layer in layers:
            # zero init: the mapped stream starts at 0, so each term starts at "predicting zero" (1 for hidden)
            # and sends the student no gradient until the map has learnt something; a random map would
            # first pull the student toward a random projection of the teacher (in the demo its features
            # term started near 540, drowning the KL)
            self.maps[str(layer)] = m = nn.Linear(width, d_teacher, dtype=torch.float32)
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask):
        if not self.maps:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits, {}
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, {int(k): m(rms_normalise(out.hidden_states[int(k)])) for k, m in self.maps.items()}

    def map_tensors(self) -> dict[str, torch.Tensor]:
        """layer{L}.weight [d_T, d_S] and layer{L}.bias [d_T] of every map, for residual_map.safetensors."""
        out = {}
        for k, m in self.maps.items():
            out[f"layer{k}.weight"] = m.weight.detach().float().cpu().contiguous()
            out[f"layer{k}.bias"] = m.bias.detach().float().cpu().contiguous()
        return out

    def save_maps(self, folder: Path, provenance: dict | None) -> None:
        """Write the maps into a student folder (nothing when there are none)."""
        if self.maps:
            formats.save_safetensors(
                folder / MAP_FILE,
                self.map_tensors(),
                kind=MAP_KIND,
                provenance=provenance,
                extra={"layers": ",".join(self.maps.keys())},
            )


def rms(x: torch.Tensor) -> torch.Tensor:
    """sqrt(mean_d x_d^2) per position: [..., d] -> [..., 1] (fp32, never 0)."""
    return x.float().square().mean(-1, keepdim=True).add(1e-12).sqrt()


def rms_normalise(x: torch.Tensor) -> torch.Tensor:
    """x / rms(x): every position at unit RMS ([..., d], in x's dtype)."""
    return (x.float() / rms(x)).to(x.dtype)


def relative_mse(mapped: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||mapped - n(teacher)||^2 / d_T per position: [b, S] (mapped already at unit scale; fp32)."""
    return (mapped.float() - teacher.float() / rms(teacher)).square().mean(-1)


def hidden_term(mapped: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor], layers: list[int]) -> torch.Tensor:
    """The FitNets term per position, averaged over the matched layers: [b, S]."""
    terms = [relative_mse(mapped[layer], teacher[layer]) for layer in layers]
    return torch.stack(terms).mean(0)
