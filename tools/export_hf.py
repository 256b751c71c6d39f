"""Export the model of an llmtrain checkpoint as a Hugging Face folder: LlamaForCausalLM for dense
models, MixtralForCausalLM or Qwen3MoeForCausalLM for mixture-of-experts models (--format).

    python tools/export_hf.py runs/<name>/checkpoints/step_00001000 hf_out/ [--dtype bf16]
    python tools/export_hf.py runs/<name> hf_out/        # newest complete checkpoint of the run
    python tools/export_hf.py runs/<moe> hf_out/ --format qwen3_moe   # refused, naming the keys, if inexact

Any engine's checkpoint (native, DeepSpeed, megatron) and LoRA checkpoints (merged first).

Writes model.safetensors (sharded with an index past --max-shard-gb), config.json and the run's
tokenizer (data.tokenizer: built-in byte level, HF tokenizer.json or sentencepiece model; see
llmtrain/checkpoint/hf_tokenizer.py); load them with
`transformers.LlamaForCausalLM.from_pretrained("hf_out")` and `AutoTokenizer.from_pretrained("hf_out")`.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtrain.checkpoint import CheckpointError
from llmtrain.checkpoint.convert import DTYPES, export_hf
from llmtrain.checkpoint.hf_moe import HF_FORMATS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a step_<N> folder, a run's checkpoints/ folder, or a run folder")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--no-tokenizer", action="store_true", help="weights and config.json only")
    ap.add_argument(
        "--format", default="auto", choices=HF_FORMATS, help="auto: llama if dense, else mixtral or qwen3_moe"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="export_hf: %(message)s")
    try:
        out = export_hf(
            args.checkpoint,
            args.out,
            args.dtype,
            args.max_shard_gb,
            not args.no_tokenizer,
            progress=True,
            hf_format=args.format,
        )
    except CheckpointError as e:
        print(f"export_hf: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
