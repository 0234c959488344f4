"""Evaluation suites (SLAKE, VQA-RAD, MedRegion splits, class folders), ``regionmed eval`` and its report."""
