"""A quick look at what a checkpoint generates: greedy or top-p sampling from a prompt.

    python tools/generate.py runs/<name> --prompt "ROMEO:" --max-new-tokens 200
    python tools/generate.py runs/<name> --prompt "Q: add 2 3\nA: " --temperature 0.8 --top-p 0.9 --seed 1

    python tools/generate.py runs/<sft run> --chat --prompt "add 2 3"   # one user turn, the SFT chat template

Temperature 0 (the default) is greedy decoding. The tokenizer is the run's data.tokenizer unless
--tokenizer names another (byte, a tokenizer.json or a sentencepiece .model). One process; LoRA
checkpoints are loaded on their base. Escapes such as \\n in --prompt are interpreted (non-ASCII
text is kept as typed). --chat renders the prompt as a user message with the run's
objective.sft.chat_template, as SFT training did, and prints the assistant's reply up to its end marker.
"""

import argparse
import codecs
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtrain.config import ConfigError
from llmtrain.distributed.env import DistEnv


def unescape(text: str) -> str:
    """Interpret backslash escapes (\\n, \\t, \\u00e9) in a command-line prompt and keep every other
    character as typed. `str.encode().decode("unicode_escape")` reads the UTF-8 bytes as Latin-1 and
    turns "Café" into "CafÃ©"; escaping the non-Latin-1 characters first round-trips them."""
    return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")


def chat_prompt(cfg, prompt: str, tok) -> tuple[list[int], str]:
    """(prompt ids, end marker) of one user turn in the run's SFT chat template."""
    from llmtrain.data.chat import TEMPLATES
    from llmtrain.objectives.sft_data import render_chat_prompt

    template = cfg.objective.sft.chat_template
    return render_chat_prompt([{"role": "user", "content": prompt}], template, tok), TEMPLATES[template][1]


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
    ap.add_argument("--chat", action="store_true", help="the prompt is a user message (SFT chat template)")
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
    prompt = unescape(args.prompt)
    prompt_ids, end = chat_prompt(loaded.cfg, prompt, tok) if args.chat else (tok.encode(prompt), None)
    ids = generate(
        loaded.model,
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        max_seq_len=loaded.cfg.model.max_seq_len,
        temperature=args.temperature,
        top_p=args.top_p,
        eos_id=tok.eos_id,
        seed=args.seed,
    )
    text = tok.decode([i for i in ids if i != tok.eos_id])
    print(text.split(end)[0] if end else prompt + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
