"""A quick look at what a checkpoint generates: greedy or top-p sampling from a prompt.

    python tools/generate.py runs/<name> --prompt "ROMEO:" --max-new-tokens 200
    python tools/generate.py runs/<name> --prompt "Q: add 2 3\nA: " --temperature 0.8 --top-p 0.9 --seed 1

Temperature 0 (the default) is greedy decoding. The tokenizer is the run's data.tokenizer unless
--tokenizer names another (byte, a tokenizer.json or a sentencepiece .model). One process; LoRA
checkpoints are loaded on their base. Escapes such as \\n in --prompt are interpreted.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtrain.config import ConfigError
from llmtrain.distributed.env import DistEnv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a step_<N> folder, a run's checkpoints/ folder, or a run folder")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="default: the run's data.tokenizer")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args(argv)
    if not 0 < args.top_p <= 1:
        ap.error(f"--top-p={args.top_p} must be within (0, 1]")

    from llmtrain.data.tokenizer import load_tokenizer
    from llmtrain.objectives.inference import generate, load_checkpoint_engine

    try:
        loaded = load_checkpoint_engine(args.checkpoint, DistEnv(0, 0, 1, 1), device=args.device)
        if loaded.cfg.objective.name == "masked_lm":
            raise ConfigError(f"{loaded.path}: a masked-LM checkpoint does not generate left to right")
        tok = load_tokenizer(args.tokenizer or loaded.cfg.data.tokenizer)
    except (ConfigError, FileNotFoundError) as e:
        print(f"generate: {e}", file=sys.stderr)
        return 2
    prompt = args.prompt.encode().decode("unicode_escape")
    ids = generate(
        loaded.model,
        tok.encode(prompt),
        max_new_tokens=args.max_new_tokens,
        max_seq_len=loaded.cfg.model.max_seq_len,
        temperature=args.temperature,
        top_p=args.top_p,
        eos_id=tok.eos_id,
        seed=args.seed,
    )
    print(prompt + tok.decode([i for i in ids if i != tok.eos_id]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
