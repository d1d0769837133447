"""Run in a fresh process: load an adapter with plain transformers + PEFT (no peftcli) and save
the logits of a fixed input.  python reload_adapter.py ADAPTER_DIR OUT.pt [4bit]"""

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

adapter, out = sys.argv[1], sys.argv[2]
base_path = json.load(open(f"{adapter}/adapter_config.json"))["base_model_name_or_path"]
kwargs = {}
if len(sys.argv) > 3 and sys.argv[3] == "4bit":
    kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.float32,
    )
    kwargs["device_map"] = {"": "cpu"}
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, **kwargs), adapter).eval()
# bitsandbytes' packed CPU kernel (AVX-512 BF16 CPUs) fails on tiny-llama's down_proj and rounds
# to bf16; peftcli keeps it off (peftcli/quant.py), and so does this plain-PEFT comparison.
for module in model.modules():
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
ids = torch.tensor([list(range(40, 72))])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, out)
assert not any(m.startswith("peftcli") for m in sys.modules), "peftcli must not be needed to load an adapter"
