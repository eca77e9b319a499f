"""What both generation paths do to an answer token by token: its text, its stop strings, and the
repetition guard over its own tokens (never the prompt's, never the end-of-turn ones)."""

from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from openai_miner.sources.base import Token
from openai_miner.sources.local_model import LoadedModel


class Decoder:
    """Turns one answer's token ids into text pieces, or :class:`Token` items with logprobs.

    Decodes a short window (the previous piece plus the new ids) rather than the whole answer, and
    holds back ids that end inside a multi-byte character. Special tokens yield no text.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # ids before this are already sent
        self.logprob = 0.0  # of the ids held back so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def push_token(
        self, token_id: int, logprob: float, top: list[tuple[int, float]]
    ) -> Token | None:
        self.logprob += logprob
        text = self.push(token_id)
        if not text:
            return None
        item = Token(text, self.logprob, tuple((self.tokenizer.decode([i]), lp) for i, lp in top))
        self.logprob = 0.0
        return item


class StopStrings:
    """Cuts an answer at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.held = ""
        self.stopped = False

    def feed(self, item: "str | Token") -> "list[str | Token]":
        if self.stopped:
            return []
        if not self.stops:
            return [item]
        if isinstance(item, Token):  # atomic: ends the answer if the text so far holds a stop
            text = self.held + item.text
            if any(stop in text for stop in self.stops):
                self.stopped = True
                return []
            self.held = text[-max(map(len, self.stops)) :]
            return [item]
        text = self.held + item
        cuts = [text.find(stop) for stop in self.stops if stop in text]
        if cuts:
            self.stopped = True
            return [text[: min(cuts)]] if min(cuts) else []
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        out = text[: len(text) - keep]
        return [out] if out else []


def penalize(
    scores: torch.Tensor, histories: Sequence[Sequence[int]], penalty: float | None, exempt: frozenset[int]
) -> torch.Tensor:
    """transformers' repetition penalty, each row over its own ``histories`` but ``exempt`` tokens."""
    if not penalty or penalty == 1.0 or not histories:
        return scores
    rows, vocab = scores.shape[0], scores.shape[-1]
    mask = torch.zeros((rows, vocab + 1), dtype=torch.bool, device=scores.device)
    for row, history in enumerate(histories[:rows]):
        ids = [token for token in history if token not in exempt]
        if ids:
            mask[row, torch.tensor(ids, dtype=torch.long, device=scores.device).clamp(max=vocab)] = True
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(mask[:, :vocab], penalized, scores)


def exempt(loaded: "LoadedModel") -> frozenset[int]:
    """Tokens the repetition guard never penalizes: the special ones (end of turn, end of text)."""
    eos = loaded.model.generation_config.eos_token_id
    ids = set(loaded.tokenizer.all_special_ids) | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return frozenset(ids)
