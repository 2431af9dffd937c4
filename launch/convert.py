"""Convert a sharded checkpoint to Hugging Face safetensors.

    python launch/convert.py CKPT_DIR OUT_DIR [--dtype bf16|fp16|fp32] [--max-shard-size 5GB] [--overwrite]
"""

from scaletrain.convert import main

if __name__ == "__main__":
    main()
