"""A lower bound on the tokens of a text, known without tokenizing it.

Tokenizing megabytes takes seconds; checking a length takes nothing. No token covers more characters than the
vocabulary's longest, and normalizers (NFKC and the like) may shorten text before it is split by at most
NORMALIZATION_SLACK, so a text of C characters has at least C // (longest * slack) tokens. The gateway and the
worker refuse a prompt too long for the context by this one rule, before tokenizing it.
"""

from __future__ import annotations

NORMALIZATION_SLACK = 2


def longest_token_chars(tokenizer) -> int:
    """Characters of the longest token in the tokenizer's vocabulary (special tokens included)."""
    return max(1, max((len(token) for token in tokenizer.get_vocab()), default=1))


def min_tokens(chars: int, longest_token: int) -> int:
    """At least this many tokens make up any text of `chars` characters (longest_token: longest_token_chars)."""
    return chars // (longest_token * NORMALIZATION_SLACK)
