"""Drop-in for torch.nn.utils.spectral_norm / remove_spectral_norm, computed by sagan_ext's fused
operator. Same signature, same state-dict keys (weight_orig, weight_u, weight_v) and the same
version metadata, so checkpoints move both ways; the hook subclasses torch's SpectralNorm, so
torch's own remove_spectral_norm and load hooks work on it too. The current sigma is kept in a
non-persistent buffer `<name>_sigma` (not in the state dict) for logging."""
from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks, backends, ops

# the module, not the function of the same name that torch.nn.utils exports
torch_sn = importlib.import_module("torch.nn.utils.spectral_norm")


def spectral_normalize(
    weight: Tensor, u: Tensor, v: Tensor, *, dim: int = 0, n_power_iterations: int = 1, eps: float = 1e-12,
    training: bool = True, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Functional spectral norm: returns (weight / sigma, sigma) and, in training, updates u and v
    in place by power iteration (no gradient flows through u, v), as torch's hook does."""
    _checks.check_spectral_norm(weight, u, v, dim, n_power_iterations, eps)
    dim = dim % weight.dim()
    w_sn, sigma, u_new, v_new = ops.spectral_norm(weight, u, v, dim, n_power_iterations, eps, training, backend)
    if training and n_power_iterations > 0:
        with torch.no_grad():
            u.copy_(u_new)
            v.copy_(v_new)
    return w_sn, sigma


class SpectralNorm(torch_sn.SpectralNorm):
    """torch's SpectralNorm hook with compute_weight running sagan_ext's operator."""

    power_iteration_in_eval = False  # class default: hooks pickled before the option existed

    def __init__(self, name="weight", n_power_iterations=1, dim=0, eps=1e-12, backend="auto",
                 power_iteration_in_eval=False):
        super().__init__(name, n_power_iterations, dim, eps)
        self.backend, self.power_iteration_in_eval = backend, power_iteration_in_eval

    def compute_weight(self, module: nn.Module, do_power_iteration: bool) -> Tensor:
        u, v = getattr(module, self.name + "_u"), getattr(module, self.name + "_v")
        if not do_power_iteration and self.power_iteration_in_eval:
            # BigGAN-PyTorch's eval: iterate from the stored u, v and keep the result to this forward
            u, v, do_power_iteration = u.clone(), v.clone(), True
        w_sn, sigma = spectral_normalize(
            getattr(module, self.name + "_orig"), u, v, dim=self.dim, n_power_iterations=self.n_power_iterations,
            eps=self.eps, training=do_power_iteration, backend=self.backend)
        sigma_buffer = getattr(module, self.name + "_sigma", None)
        if sigma_buffer is not None:
            with torch.no_grad():
                sigma_buffer.copy_(sigma.detach())
        return w_sn


def _default_dim(module: nn.Module) -> int:
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    return 1 if isinstance(module, transposed) else 0


def spectral_norm(
    module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
    dim: Optional[int] = None, *, backend: str = "auto", power_iteration_in_eval: bool = False,
) -> nn.Module:
    """Apply spectral normalisation to `module.<name>` (like torch.nn.utils.spectral_norm).
    power_iteration_in_eval=True: eval forwards also run the power iteration from the stored u, v
    without saving it, as BigGAN-PyTorch's SN layers do; by default eval uses the stored u, v, as
    torch's does."""
    backends.check_name(backend)
    if dim is None:
        dim = _default_dim(module)
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, torch_sn.SpectralNorm) and hook.name == name:
            raise RuntimeError(f"Cannot register two spectral_norm hooks on the same parameter {name}")
    weight = module._parameters.get(name)
    if not isinstance(weight, Tensor):
        raise ValueError(f"module has no parameter named {name!r} to normalise")
    if n_power_iterations <= 0:
        raise ValueError(f"Expected n_power_iterations to be positive, but got n_power_iterations={n_power_iterations}")
    fn = SpectralNorm(name, n_power_iterations, dim, eps, backend, power_iteration_in_eval)
    with torch.no_grad():
        weight_mat = fn.reshape_weight_to_matrix(weight)
        h, w = weight_mat.size()
        u = F.normalize(weight.new_empty(h).normal_(0, 1), dim=0, eps=fn.eps)
        v = F.normalize(weight.new_empty(w).normal_(0, 1), dim=0, eps=fn.eps)
    delattr(module, fn.name)
    module.register_parameter(fn.name + "_orig", weight)
    setattr(module, fn.name, weight.data)
    module.register_buffer(fn.name + "_u", u)
    module.register_buffer(fn.name + "_v", v)
    module.register_buffer(fn.name + "_sigma", weight.new_ones(()), persistent=False)
    module.register_forward_pre_hook(fn)
    module._register_state_dict_hook(torch_sn.SpectralNormStateDictHook(fn))
    module._register_load_state_dict_pre_hook(torch_sn.SpectralNormLoadStateDictPreHook(fn))
    return module


def remove_spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Remove the spectral norm (sagan_ext's or torch's) from `module.<name>`."""
    if hasattr(module, name + "_sigma") and isinstance(getattr(module, name + "_sigma"), Tensor):
        del module._buffers[name + "_sigma"]
    return torch_sn.remove_spectral_norm(module, name)


def sigma(module: nn.Module, name: str = "weight") -> Tensor:
    """The sigma of the last forward of a module normalised by sagan_ext.spectral_norm."""
    return getattr(module, name + "_sigma")


def spectral_norm_sigmas(model: nn.Module) -> dict[str, float]:
    """{qualified module name: sigma} for every sagan_ext spectral-norm layer in `model` (one sync).
    Hooks sagan_ext.fuse put in place of torch's keep no sigma (it adds no buffers) and are left out."""
    found = {f"{prefix}.{hook.name}".lstrip("."): getattr(m, hook.name + "_sigma")
             for prefix, m in model.named_modules() for hook in m._forward_pre_hooks.values()
             if isinstance(hook, SpectralNorm) and isinstance(getattr(m, hook.name + "_sigma", None), Tensor)}
    if not found:
        return {}
    values = torch.stack(list(found.values())).tolist()
    return dict(zip(found, values))
