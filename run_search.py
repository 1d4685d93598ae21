#!/usr/bin/env python3
"""Hardware-aware architecture search and ablation for EHR-SR: ``python run_search.py --help``."""

from ehrsr.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
