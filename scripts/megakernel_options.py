"""The megakernel chain's opt-in options as command-line flags, written once for the scripts that build or compile
it (issue 4): `megakernel_step_bench.py` passes them to `Chain`, `megakernel_compile_check.py` as the kernel's
constexprs. A new `Chain` option needs one row here."""

from __future__ import annotations

import argparse

# flag, Chain's keyword, the kernel's constexpr, help; each flag sets its keyword to True, except --rank-weights,
# which turns the default rank_keys off
OPTIONS = (
    ("--lean-release", "lean_release", "LEAN", "the proxy fence that frees a ring slot in the producer, not in every "
     "consumer thread (untimed, session 18)"),
    ("--rank-weights", "rank_keys", "KEYS", "the router ranked on its experts' weights, not on its logits as integer "
     "keys (~10 us a step slower, session 20)"),
    ("--counted-polls", "counted_polls", "COUNTED", "a staging waits on its input phase's published count before "
     "polling the words (25-30 us a step slower, session 20)"),
    ("--pipelined", "pipelined", "PIPE", "each slot's loads before the previous slot's arithmetic (session 21: no "
     "gain)"),
)
INVERTED = {"rank_keys"}


def add_options(p: argparse.ArgumentParser) -> None:
    for flag, keyword, _, text in OPTIONS:
        on = keyword not in INVERTED                 # the value the flag sets
        p.add_argument(flag, dest=keyword, action="store_true" if on else "store_false",
                       help=f"{text} (`Chain({keyword}={on})`)")


def chain_kwargs(args: argparse.Namespace) -> dict[str, bool]:
    """The options as `Chain`'s keywords."""
    return {keyword: getattr(args, keyword) for _, keyword, _, _ in OPTIONS}


def constexprs(args: argparse.Namespace) -> dict[str, bool]:
    """The options as the chain kernel's constexprs."""
    return {name: getattr(args, keyword) for _, keyword, name, _ in OPTIONS}
