"""The LLM's linear layers while serving: `ServingLinear`, swapped in for `nn.Linear` by class only
(parameters, hooks and state-dict keys stay), changes how the product runs on the CPU, never its result
beyond the last bits.

- **Prepacked weights** (on by default; `vlbridge serve --no-prepack` turns them off). BLAS (MKL) packs
  the weight into its kernels' layout on every call (and on AMD CPUs takes its pre-AVX-512 path); with
  the few rows of a decode step (one per running request) that costs more than the arithmetic. oneDNN's
  product instead reads a copy packed once at start. Measured on the `mid` model's 84 products, 2-core
  CPU: 18 ms instead of 40 at 16 rows, 13 instead of 22 at one row, 507 instead of 611 at 720 (a
  prefill). The copy costs the linear weights' memory once more: the dense weight stays for what needs
  it (the compiled step, training, state dicts), and once it changes the stale copy goes unused.
- **Compiled one-row products** (`--compile`, serve/compiled_decode.py): multiply-and-sum instead of a
  BLAS call, which the compiler fuses into a single read of the weight (about twice BLAS's speed there;
  oneDNN's packed product cannot be traced). Other compiled products, products with gradients, and
  GPUs' (whose BLAS already reads at full bandwidth) are `nn.Linear`'s.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("vlbridge.serve")

PACK_ROWS = 16  # the row count oneDNN picks its blocked layout for; it serves any count


class ServingLinear(torch.nn.Linear):
    """`nn.Linear` with a prepacked CPU product (`pack`) and a fusable compiled one-row product."""

    packed: torch.Tensor | None = None
    packed_from: tuple[torch.Tensor, int] | None = None  # the weight packed, and its version then

    def pack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_ROWS)
        self.packed_from = (self.weight, self.weight._version)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inference_on_cpu = x.device.type == "cpu" and not torch.is_grad_enabled()
        if torch.compiler.is_compiling():
            if inference_on_cpu and x.shape[:-1].numel() == 1:
                y = (self.weight * x.unsqueeze(-2)).sum(-1)
                return y if self.bias is None else y + self.bias
        elif inference_on_cpu and self._packed_is_current(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _packed_is_current(self, x: torch.Tensor) -> bool:
        if self.packed is None or x.dtype != self.packed.dtype:
            return False
        weight, version = self.packed_from
        return weight is self.weight and version == self.weight._version and weight.device == x.device


def serving_linears(language_model: torch.nn.Module, *, pack: bool) -> float:
    """Make the plain linear layers of `language_model` `ServingLinear`s and, with `pack`, prepack those
    whose weights are float32 on the CPU (where this torch has oneDNN; without `pack`, drop earlier
    packed copies); returns the MB the packed copies take (0: none)."""
    layers = [layer for layer in language_model.modules() if type(layer) in (torch.nn.Linear, ServingLinear)]
    for layer in layers:
        layer.__class__ = ServingLinear
        layer.packed = layer.packed_from = None
    on_cpu = [layer for layer in layers if layer.weight.device.type == "cpu"]
    packable = [layer for layer in on_cpu if layer.weight.dtype == torch.float32] if pack else []
    if not packable:
        return 0.0
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        log.warning("prepacked weights: this torch has no oneDNN products; linear layers use BLAS")
        return 0.0
    try:
        for layer in packable:
            layer.pack()
    except RuntimeError as err:  # a oneDNN build without the packing op: BLAS, as without packing
        for layer in packable:
            layer.packed = layer.packed_from = None
        log.warning("prepacked weights: oneDNN could not pack (%s); linear layers use BLAS", err)
        return 0.0
    return sum(layer.weight.nbytes for layer in packable) / 2**20
