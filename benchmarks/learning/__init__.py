"""Learning studies: curves of a config, the study of variants, signal at initialisation, slot
usage, the shipped checkpoint's quality (benchmarks/README.md)."""
