"""Imported by every Python a test starts with this folder on PYTHONPATH (a `sitecustomize` module).

With LRS_PAUSE_AT set: once the Stage 1 cache holds that many entries, the process that stored the last of them
writes the file LRS_PAUSE_MARKER and waits there, so that a test's SIGKILL lands at that point however fast the
machine is. Counting files in the cache rather than this process's stores also serves several ranks.
"""

import os

if os.environ.get("LRS_PAUSE_AT"):
    import time
    from pathlib import Path

    from optimum_lrs.stage1 import cache

    store = cache.store

    def store_then_pause(cache_dir, *args):
        store(cache_dir, *args)
        if len(list(Path(cache_dir).glob("*.safetensors"))) >= int(os.environ["LRS_PAUSE_AT"]):
            Path(os.environ["LRS_PAUSE_MARKER"]).touch()
            time.sleep(600)

    cache.store = store_then_pause
