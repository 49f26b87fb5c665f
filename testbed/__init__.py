"""The miniature test bed: random-init tiny replicas and, later, the procedurally drawn world. Never imported by
ar_models or the ML library."""
