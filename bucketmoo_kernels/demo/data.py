"""Real multilingual text that ships inside an installed package: Babel's CLDR locale data.

Babel (https://babel.pocoo.org, BSD-3-Clause licence) bundles the Unicode Common Locale
Data Repository (CLDR, https://cldr.unicode.org, Unicode License v3) as pickled locale
files. Every locale holds a few thousand localized strings written by native speakers:
names of languages, territories, scripts, currencies, units, months and days, and number
and date patterns. :func:`load_cldr_strings` walks one locale's own data (without the
strings inherited from the root locale, which are the same in every language), keeps the
strings that contain a letter and removes duplicates. Nothing is downloaded at run time.

Tokens are UTF-8 bytes, so Cyrillic or Arabic text costs about two bytes per character and
those languages have more training bytes than Latin-script ones of the same string count.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

__all__ = ["DATA_SOURCE", "LanguageData", "load_cldr_strings", "load_languages", "sample_batch",
           "heldout_windows", "static_weights"]

DATA_SOURCE = ("Unicode CLDR locale data (Unicode License v3) as bundled by Babel "
               "(BSD-3-Clause), read with babel.localedata.load(code, merge_inherited=False)")


@dataclass(frozen=True)
class LanguageData:
    """One language's text as bytes.

    Attributes:
        code: CLDR locale id (``"de"``, ``"sw"``, ...).
        name: English name of the language.
        train: ``[n_train]`` uint8 UTF-8 bytes, strings joined by newlines.
        heldout: ``[n_heldout]`` uint8 bytes of the held-out strings (never trained on).
        num_strings: number of distinct strings before the split.
    """

    code: str
    name: str
    train: torch.Tensor
    heldout: torch.Tensor
    num_strings: int


def _require_babel():
    try:
        import babel
        import babel.localedata
    except ImportError as exc:  # pragma: no cover - babel is a demo dependency
        raise ImportError("the demo reads its text from Babel's CLDR data: "
                          "pip install babel  (or pip install 'bucketmoo_kernels[demo]')") from exc
    return babel


def _walk(node, out: list[str]) -> None:
    if isinstance(node, str):
        out.append(node)
    elif hasattr(node, "items"):
        for value in node.values():
            _walk(value, out)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _walk(value, out)


def load_cldr_strings(code: str) -> list[str]:
    """Distinct localized strings (with at least one letter) of CLDR locale ``code``."""
    babel = _require_babel()
    if not babel.localedata.exists(code):
        raise ValueError(f"unknown CLDR locale {code!r}; see babel.localedata.locale_identifiers()")
    found: list[str] = []
    _walk(babel.localedata.load(code, merge_inherited=False), found)
    strings = (s.strip() for s in found)
    return list(dict.fromkeys(s for s in strings if any(c.isalpha() for c in s)))


def _english_name(code: str) -> str:
    babel = _require_babel()
    try:
        return babel.Locale.parse(code).get_display_name("en") or code
    except (ValueError, babel.UnknownLocaleError):
        return code


def to_bytes(strings: list[str]) -> torch.Tensor:
    """``strings`` as one uint8 tensor of UTF-8 bytes, each string ended by a newline."""
    raw = "\n".join(strings).encode("utf-8") + b"\n"
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def load_languages(codes, heldout_share: float = 0.1, seed: int = 0,
                   min_bytes: int = 0) -> dict[str, LanguageData]:
    """Load and split the CLDR strings of each language in ``codes``.

    Each language's strings are shuffled with ``random.Random(seed)`` and the last
    ``heldout_share`` of them (at least one) is held out. The split is by string, so no
    held-out string is ever seen in training.

    Args:
        codes: CLDR locale ids.
        heldout_share: share of strings held out, in (0, 1).
        seed: shuffle seed (the same split for every method and run).
        min_bytes: raise if a split has fewer bytes than this (one sequence plus one).
    Returns:
        ``{code: LanguageData}`` in the order of ``codes``.
    """
    if not 0.0 < heldout_share < 1.0:
        raise ValueError(f"heldout_share must be in (0, 1); got {heldout_share}")
    out = {}
    for code in codes:
        strings = load_cldr_strings(code)
        random.Random(f"{seed}-{code}").shuffle(strings)
        n_heldout = max(1, round(heldout_share * len(strings)))
        lang = LanguageData(code, _english_name(code), to_bytes(strings[:-n_heldout]),
                            to_bytes(strings[-n_heldout:]), len(strings))
        for part in ("train", "heldout"):
            if getattr(lang, part).numel() < min_bytes:
                raise ValueError(f"language {code!r}: {part} split has {getattr(lang, part).numel()} "
                                 f"bytes, fewer than the {min_bytes} needed; raise heldout_share "
                                 "or shorten the context")
        out[code] = lang
    return out


def sample_batch(data: torch.Tensor, batch: int, context: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of a byte stream.

    Args:
        data: ``[n]`` uint8 bytes with ``n > context``.
        batch, context: windows per batch and bytes per window.
        generator: CPU generator; the same seed gives the same batches.
    Returns:
        ``(inputs, targets)``, each ``[batch, context]`` int64; targets are shifted by one byte.
    """
    if data.numel() <= context:
        raise ValueError(f"data has {data.numel()} bytes; need more than context = {context}")
    starts = torch.randint(0, data.numel() - context, (batch,), generator=generator)
    windows = torch.stack([data[s: s + context + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def heldout_windows(data: torch.Tensor, context: int,
                    max_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed, non-overlapping evaluation windows from the start of a byte stream.

    Returns ``(inputs, targets)`` ``[W, context]`` int64 with ``W = min(max_windows,
    (n - 1) // context)``.
    """
    count = min(max_windows, (data.numel() - 1) // context)
    if count < 1:
        raise ValueError(f"held-out data has {data.numel()} bytes; need more than context = {context}")
    used = data[: count * context + 1].long()
    return used[:-1].view(count, context), used[1:].view(count, context)


def static_weights(sizes, tau: float) -> list[float]:
    """Temperature re-weighting by data size: ``w_l = n_l^(1/tau) / sum_k n_k^(1/tau)``.

    ``tau = 1`` weights languages in proportion to their data (what pooling all data
    gives); larger ``tau`` flattens towards uniform weights (plain DDP's average).

    Args:
        sizes: per-language data sizes (bytes), all > 0.
        tau: temperature, > 0.
    Returns:
        weights summing to 1, in the order of ``sizes``.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0; got {tau}")
    sizes = [float(s) for s in sizes]
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"sizes must be positive; got {sizes}")
    powered = [s ** (1.0 / tau) for s in sizes]
    total = sum(powered)
    return [p / total for p in powered]
