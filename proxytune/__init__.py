"""proxytune, the ML library: DreamBooth supervisor -> proxy images -> AR student tuning -> DreamBench evaluation.

The pipeline's plumbing is `orchestration`, its stages `tasks`, its flows `flows`; the miniature world `testbed`."""
