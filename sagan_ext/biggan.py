"""Deprecated: sagan_ext.biggan named both the attention variant ("biggan") and BigGAN-PyTorch's
checkpoint format. Its functions now live in sagan_ext.biggan_checkpoints (the state-dict
conversions) and sagan_ext.dropin (replace_biggan_attention, formerly replace_attention); using
them through this module warns once per place of use."""
import warnings

from . import biggan_checkpoints, dropin

_MOVED = {name: (biggan_checkpoints, name) for name in
          ("from_biggan_state_dict", "to_biggan_state_dict", "layer_from_biggan", "attention_load_pre_hook")}
_MOVED["replace_attention"] = (dropin, "replace_biggan_attention")


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, new_name = _MOVED[name]
    warnings.warn(f"sagan_ext.biggan.{name} is deprecated: use {module.__name__}.{new_name}", DeprecationWarning,
                  stacklevel=2)
    return getattr(module, new_name)
