"""Compare a converted Hugging Face folder against the training checkpoint it came from.

    python benchmarks/hf_logits_check.py CKPT_FOLDER HF_DIR

Our model gets the checkpoint's weights through the engines' own consolidation tools
(dcp_to_torch_save / DeepSpeed's zero_to_fp32), transformers loads HF_DIR, and both run the same
tokens (on the GPU when there is one); prints the largest logit difference.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaletrain.checkpoint import COMPLETE  # noqa: E402
from scaletrain.model import Llama, ModelConfig  # noqa: E402


def main() -> None:
    ckpt, hf_dir = Path(sys.argv[1]), sys.argv[2]
    meta = json.loads((ckpt / COMPLETE).read_text())
    if meta["engine"] == "fsdp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        out = Path(tempfile.mkdtemp()) / "full.pt"
        dcp_to_torch_save(str(ckpt), str(out))
        sd = torch.load(out, weights_only=False)["model"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = Llama(ModelConfig(**meta["model_config"])).eval()
    ours.load_state_dict(sd)
    ours.to(device)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).to(device).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 128), device=device)
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    print(f"{meta['engine']} checkpoint {ckpt} (step {meta['step']}) vs {hf_dir} on {device}: "
          f"max |logit difference| = {diff:.3g}")
    if diff > 1e-3:
        sys.exit("MISMATCH")


if __name__ == "__main__":
    main()
