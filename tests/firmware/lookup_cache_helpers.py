# The runtime's map-lookup cache overwritten, shared by the instruction-count tests
# (MPTEST_HELPERS = ("lookup_cache_helpers.py",)): the harness appends this after the
# test file's own source. Both lists are made once, before a measurement, and the
# lookups go through locals only, so what a test measures around _look_up is unchanged.


def _names_one_per_cache_slot():
    """(dicts, keys): interned names, one for each slot of the runtime's map-lookup cache
    a name can take (MICROPY_OPT_MAP_LOOKUP_CACHE: 128 entries indexed by the name's
    object >> 2, (qstr << 3 | 2) >> 2, so the 64 even ones), each with a module dict that
    holds it; looking them all up leaves no entry of the cache as it was. Two lists made
    once (the STM32 board's heap, fragmented by the Tracker and the replies, had no room
    for a dict's growth)."""
    import builtins
    import sys

    dicts = [None] * 64
    keys = [None] * 64
    # the loaded modules' globals, then the built-in modules' (the cache serves every map:
    # a slot no loaded module's name takes, since payload.tracking keeps fewer globals on
    # the STM32 board, is taken by a built-in name)
    modules = [sys.modules[name] for name in sys.modules] + [builtins, sys]
    for module in modules:
        names = getattr(module, "__dict__", None)
        if not isinstance(names, dict):
            continue
        for key in names:
            if isinstance(key, str):
                slot = ((id(key) >> 2) % 128) >> 1
                if keys[slot] is None:
                    dicts[slot] = names
                    keys[slot] = key
    return dicts, keys


def _look_up(dicts, keys):
    for i in range(64):
        dicts[i][keys[i]]
