"""Entry point of ranks > 0: `python -m crosspool.pools.ranks --kv-ranks K --weights-ranks M ...`
(spawned by crosspool, or started by torchrun). A module of its own so that running it never executes
`transport` a second time as `__main__`."""

from crosspool.pools.transport import rank_main

if __name__ == "__main__":
    rank_main()
