"""Text samples during training: at each evaluation, continuations of a few fixed prompts per domain, decoded with
the run's tokenizer (what a loss curve cannot tell: is it learning to write LaTeX, or repeating one word?).

Every rank runs the same forward passes (sharded engines gather parameters collectively); rank 0 logs. Greedy
decoding always; with ``--sample-top-p P`` also one nucleus sample per prompt at temperature 1 from a generator
seeded by the run's seed and the step, so a resumed run samples what the straight run did. All prompts' continuations
are one batch: each new token is one forward pass of every row (so a sharded engine gathers its parameters once per
token, not once per token and prompt). No KV cache: each pass runs the whole rows again (a few prompts of a few dozen
tokens; the cost is logged with evaluation time).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scaletrain.config import ConfigError
from scaletrain.files import read_text

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
    text = read_text(file, "--sample-prompts", ConfigError)
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
        empty = sorted(d for d, v in data.items() if any(not x.strip() for x in v))
        if empty:
            raise ConfigError(f"--sample-prompts: {path}: an empty prompt under {', '.join(empty)}; a continuation "
                              f"needs some text to follow")
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
def continue_prompts(forward, rows: list[list[int]], new_tokens: int, max_len: int, device: torch.device,
                     eos_id: int | None, top_ps: list[float], generator: torch.Generator | None = None
                     ) -> list[list[int]]:
    """``new_tokens`` more ids after each of ``rows``, all rows in one batch per token (greedy where ``top_ps[i]``
    is 0, else nucleus); a row stops at EOS. Rows are padded on the right: under causal attention a row's tokens
    never see the padding after them, so each row's next token is read at its own last position and equals what
    the row alone would give. The same number of forward passes on every rank whatever it generates (a sharded
    engine's forward gathers parameters collectively; the activations' shapes may differ between ranks)."""
    outs = [list(r) for r in rows]
    stopped = [False] * len(rows)
    for _ in range(new_tokens):
        windows = [o[-max_len:] for o in outs]
        lengths = torch.tensor([len(w) for w in windows])
        batch = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, w in enumerate(windows):
            batch[i, :len(w)] = torch.tensor(w)
        logits = forward(batch.to(device))[torch.arange(len(rows), device=device), lengths.to(device) - 1]
        for i, p in enumerate(top_ps):
            if stopped[i]:
                continue
            nxt = int(logits[i].argmax()) if not p else _top_p(logits[i], p, generator)
            outs[i].append(nxt)
            stopped[i] = eos_id is not None and nxt == eos_id
    return [o[len(r):] for o, r in zip(outs, rows)]


class Sampler:
    """Builds each evaluation's samples: {domain: [(prompt, how, text), ...]} on every rank."""

    def __init__(self, cfg, tokenizer_info, tokenizer_file: Path | None, device: torch.device) -> None:
        from scaletrain.data.tokenizer import load_tokenizer

        self.cfg, self.device = cfg, device
        self.info = tokenizer_info
        self.tok = load_tokenizer(str(tokenizer_file) if tokenizer_file else None, tokenizer_info.eos_token,
                                  tokenizer_info.bos_token, tokenizer_info.parse_special)
        self.prompts = load_prompts(cfg.sample_prompts, list(cfg.data_sources))

    def sample(self, module, step: int) -> dict[str, list[tuple[str, str, str]]]:
        was_training = module.training
        module.eval()
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        out: dict[str, list[tuple[str, str, str]]] = {}
        hows = [("greedy", 0.0)] + ([(f"top-p {cfg.sample_top_p:g}", cfg.sample_top_p)] if cfg.sample_top_p else [])
        jobs = []  # (domain, prompt, how, top_p, ids): every prompt's continuations, generated as one batch
        for domain, prompts in self.prompts.items():
            for prompt in prompts:
                ids = [int(i) for i in self.tok.encode(prompt)]
                if self.info.add_bos and self.info.bos_id is not None:
                    ids = [self.info.bos_id] + ids
                jobs += [(domain, prompt, how, p, ids) for how, p in hows]
        try:
            new = continue_prompts(module, [j[4] for j in jobs], cfg.sample_tokens, cfg.max_seq_length, self.device,
                                   self.info.eos_id, [j[3] for j in jobs], gen)
            for (domain, prompt, how, _, _), ids in zip(jobs, new):
                out.setdefault(domain, []).append((prompt, how, self.tok.decode(ids)))
        finally:
            module.train(was_training)
        return out


def as_markdown(samples: list[tuple[str, str, str]]) -> str:
    """One domain's samples as Markdown (TensorBoard's text plugin renders it): the prompt in bold, then the text."""
    return "\n\n".join(f"**{prompt}** _({how})_ {text}".replace("\n", "  \n") for prompt, how, text in samples)
