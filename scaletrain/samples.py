"""Text samples during training: at each evaluation, continuations of a few fixed prompts per domain, decoded with
the run's tokenizer (what a loss curve cannot tell: is it learning to write LaTeX, or repeating one word?).

Every rank runs the same forward passes (sharded engines gather parameters collectively); rank 0 logs. Greedy
decoding always; with ``--sample-top-p P`` also one nucleus sample per prompt at temperature 1 from a generator
seeded by the run's seed and the step, so a resumed run samples what the straight run did. No KV cache: each new
token runs the whole row again (a few prompts of a few dozen tokens; the cost is logged with evaluation time).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scaletrain.config import ConfigError

# two per domain: an opening a corpus of that kind has seen many times, and a continuation that needs content
DEFAULT_PROMPTS = {
    "arxiv": ["\\section{Introduction}\nLet $G$ be a finite group and", "\\begin{theorem}\nFor every integer $n"],
    "general": ["The history of the city begins", "Here are three tips for"],
}
GENERIC_PROMPTS = ["The", "In this"]


def load_prompts(path: str | None, domains: list[str]) -> dict[str, list[str]]:
    """{domain: prompts}: from a JSON object of lists, a text file (one prompt a line, every domain), or the
    built-in ones. A JSON file that names a domain the run does not train on is refused (a typo, most likely)."""
    if path is None:
        return {d: DEFAULT_PROMPTS.get(d, GENERIC_PROMPTS) for d in domains}
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--sample-prompts: file {path!r} does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--sample-prompts: {path}: line {e.lineno} column {e.colno}: {e.msg}") from e
        if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(p, str) for p in v)
                                                 for v in data.values()):
            raise ConfigError(f"--sample-prompts: {path} must hold {{\"domain\": [\"prompt\", ...]}}")
        unknown = sorted(set(data) - set(domains))
        if unknown:
            raise ConfigError(f"--sample-prompts: {path} names {', '.join(unknown)}, which this run does not train "
                              f"on (its domains: {', '.join(domains)})")
        return {d: data[d] for d in domains if data.get(d)}
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--sample-prompts: {path} has no prompts (one a line)")
    return {d: prompts for d in domains}


def _top_p(logits: torch.Tensor, p: float, generator: torch.Generator) -> int:
    probs = torch.softmax(logits.float(), dim=-1).cpu()
    sorted_p, idx = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < p  # the smallest set whose mass reaches p (the top token always)
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
    return int(idx[choice])


@torch.no_grad()
def continue_prompt(forward, ids: list[int], new_tokens: int, max_len: int, device: torch.device,
                    eos_id: int | None, top_p: float = 0.0, generator: torch.Generator | None = None) -> list[int]:
    """``new_tokens`` more ids after ``ids`` (greedy, or nucleus with ``top_p``); stops at EOS. The same number of
    forward passes on every rank whatever it generates (a sharded engine's forward is a collective)."""
    out = list(ids)
    stopped = False
    for _ in range(new_tokens):
        row = torch.tensor([out[-max_len:]], device=device)
        logits = forward(row)[0, -1]
        if stopped:
            continue
        nxt = int(logits.argmax()) if not top_p else _top_p(logits, top_p, generator)
        out.append(nxt)
        stopped = eos_id is not None and nxt == eos_id
    return out[len(ids):]


class Sampler:
    """Builds each evaluation's samples: {domain: [(prompt, how, text), ...]} on every rank."""

    def __init__(self, cfg, tokenizer_info, tokenizer_file: Path | None, device: torch.device) -> None:
        from scaletrain.data.tokenizer import load_tokenizer

        self.cfg, self.device = cfg, device
        self.info = tokenizer_info
        self.tok = load_tokenizer(str(tokenizer_file) if tokenizer_file else None, tokenizer_info.eos_token,
                                  tokenizer_info.bos_token)
        self.prompts = load_prompts(cfg.sample_prompts, list(cfg.data_sources))

    def sample(self, module, step: int) -> dict[str, list[tuple[str, str, str]]]:
        was_training = module.training
        module.eval()
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        out: dict[str, list[tuple[str, str, str]]] = {}
        try:
            for domain, prompts in self.prompts.items():
                for prompt in prompts:
                    ids = [int(i) for i in self.tok.encode(prompt)]
                    if self.info.add_bos and self.info.bos_id is not None:
                        ids = [self.info.bos_id] + ids
                    hows = [("greedy", 0.0)] + ([(f"top-p {cfg.sample_top_p:g}", cfg.sample_top_p)]
                                                if cfg.sample_top_p else [])
                    for how, p in hows:
                        new = continue_prompt(module, ids, cfg.sample_tokens, cfg.max_seq_length, self.device,
                                              self.info.eos_id, p, gen)
                        out.setdefault(domain, []).append((prompt, how, self.tok.decode(new)))
        finally:
            module.train(was_training)
        return out


def as_markdown(samples: list[tuple[str, str, str]]) -> str:
    """One domain's samples as Markdown (TensorBoard's text plugin renders it): the prompt in bold, then the text."""
    return "\n\n".join(f"**{prompt}** _({how})_ {text}".replace("\n", "  \n") for prompt, how, text in samples)
