"""The special tokens of an ESPnet S2T (OWSM) or Dolphin token list: languages, regions, task, time stamps.

Dolphin's real list (the `dataoceanai-dolphin` package's assets/config.yaml, 40002 tokens) is laid out as
    0..6        <blank> <unk> <na> <nospeech> <nopunc> <itn> <asr>    non-language specials and the task
    7..144      <ab> .. <zu>          138 languages: two or three lower-case letters, one block of ids
    145..323    <AD> .. <ZA>          179 regions: upper-case letters, one block of ids (countries <CN>, Chinese
                                      dialects <SICHUAN> <SHANXI> <WU>, <NULL>, <GLA>, <LVT>, ...)
    324         <notimestamp>         (OWSM spells it <notimestamps>)
    325..1825   <0.00> .. <30.00>     time stamps in 20 ms steps
    ...         text pieces, then <sos> <eos> <sop>
OWSM v3 lists have <abk> .. <zul> before <asr>, <notimestamps>, the same time stamps and no regions.

Dolphin and ESPnet name their language and region sets by their first and last symbols (Dolphin's constants
<ab>/<zu> and <AD>/<ZA>, ESPnet's Speech2Language <abk>/<zul>) and take every id in between. Without those names
we find the same blocks by rule:
    languages = the longest run of consecutive ids whose tokens are `<` + 2-3 lower-case letters + `>`, leaving out
                the non-language specials that look alike (<na> <itn> <asr> <sos> <eos> <sop> <unk> <pad> ...);
    regions   = the longest run of consecutive ids whose tokens are `<` + upper-case letters + `>`;
    time      = the ids from the first to the last `<seconds.hundredths>` token (ESPnet's ScoreFilter range).
On Dolphin's list this gives exactly <ab>..<zu> (138) and <AD>..<ZA> (179); all 76 language-region pairs of
Dolphin's table (zh-CN .. zh-SICHUAN .. az-AZ) are a language of the first block and a region of the second.

Special text: ESPnet S2T's `text_nospecial`, which Dolphin returns as its text, drops every token that starts with
`<` and ends with `>` (prompt, time stamps, <unk>, ...).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

LANGUAGE_TOKEN = re.compile(r"^<[a-z]{2,3}>$")
REGION_TOKEN = re.compile(r"^<[A-Z]+>$")
TIME_TOKEN = re.compile(r"^<\d+\.\d+>$")
NOT_LANGUAGES = frozenset({"<na>", "<itn>", "<asr>", "<unk>", "<sos>", "<eos>", "<sop>", "<pad>", "<mask>",
                           "<bos>", "<cls>", "<sep>"})
NO_TIMESTAMPS = ("<notimestamp>", "<notimestamps>")  # Dolphin's spelling, OWSM's spelling


def _longest_run(ids: list[int]) -> list[int]:
    """The longest block of consecutive integers in the sorted list ids (the first one on a tie)."""
    best: list[int] = []
    run: list[int] = []
    for i in ids:
        run = run + [i] if run and i == run[-1] + 1 else [i]
        if len(run) > len(best):
            best = run
    return best


def is_special(token: str) -> bool:
    """ESPnet S2T's rule for tokens left out of `text_nospecial`: it starts with '<' and ends with '>'."""
    return token[:1] == "<" and token[-1:] == ">"


@dataclass(frozen=True)
class S2TTokens:
    """Ids of the prompt tokens of a token list (empty / None where the list has none)."""

    languages: tuple[int, ...]
    regions: tuple[int, ...]
    asr: int | None
    notimestamps: int | None
    times: tuple[int, ...]

    @classmethod
    def from_token_list(cls, token_list: list[str]) -> "S2TTokens":
        """The blocks of the module docstring, found by rule in token_list."""
        langs = [i for i, t in enumerate(token_list) if LANGUAGE_TOKEN.match(t) and t not in NOT_LANGUAGES]
        regions = [i for i, t in enumerate(token_list) if REGION_TOKEN.match(t)]
        times = [i for i, t in enumerate(token_list) if TIME_TOKEN.match(t)]
        index = {t: i for i, t in enumerate(token_list)}
        notime = next((index[t] for t in NO_TIMESTAMPS if t in index), None)
        return cls(
            languages=tuple(_longest_run(langs)), regions=tuple(_longest_run(regions)), asr=index.get("<asr>"),
            notimestamps=notime, times=tuple(range(times[0], times[-1] + 1)) if times else (),
        )

    def prompt_tail(self) -> list[int]:
        """What follows <sos><lang>[<region>]: <asr>, then <notimestamp(s)> when the list has it (we never ask the
        decoder for time stamps; word times come from the CTC alignment)."""
        return [self.asr] + ([self.notimestamps] if self.notimestamps is not None else [])

    def suppressed(self, prompt: list[int]) -> list[int]:
        """Tokens ESPnet S2T's ScoreFilter forbids after `prompt`: every time stamp once <notimestamp(s)> is in it."""
        return list(self.times) if self.notimestamps is not None and self.notimestamps in prompt else []


def token_id(token_list: list[str], symbol: str, kind: str, allowed: tuple[int, ...]) -> int:
    """Id of a language / region given as 'zh', 'SICHUAN' or '<zh>'; a clear error naming the choices."""
    tok = symbol if symbol.startswith("<") else f"<{symbol}>"
    i = token_list.index(tok) if tok in token_list else None
    if i is None or i not in allowed:
        names = ", ".join(token_list[j][1:-1] for j in allowed)
        raise ValueError(f"{kind} {symbol!r} is not one of this model's {kind}s ({names})")
    return i
