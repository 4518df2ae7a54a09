"""Start a VllmEngine from a config file, generate a few prompts, write describe() as JSON (for the cache tests).

Usage: python tests/gpu/start_engine.py CONFIG.yaml OUT.json
"""

from __future__ import annotations

import json
import sys
import time

from hpcrollout.config import load_config
from hpcrollout.engines.vllm_engine import VllmEngine
from tests.gpu.helpers import chat_request


def main(config_path: str, out_path: str) -> int:
    began = time.time()
    engine = VllmEngine(load_config(config_path))
    results = list(engine.generate([chat_request(i) for i in range(4)]))
    info = engine.describe()
    info.update(began=began, ended=time.time(), ok=all(r.error is None for r in results))
    engine.close()
    with open(out_path, "w") as f:
        json.dump(info, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
