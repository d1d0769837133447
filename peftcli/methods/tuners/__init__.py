"""peftcli's own PEFT methods, written as PEFT tuners and registered with PEFT on import.

Importing this package pulls in torch, transformers and PEFT, so only code that is about to build
or load a PEFT model imports it (never `peftcli/__init__.py`). After `import peftcli.methods.tuners`,
`get_peft_model`, `save_pretrained` and `PeftModel.from_pretrained` handle these methods like
PEFT's own.
"""

from peftcli.methods.tuners.bottleneck import BottleneckConfig, BottleneckLayer, BottleneckModel

__all__ = ["BottleneckConfig", "BottleneckLayer", "BottleneckModel"]
