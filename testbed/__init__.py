"""The miniature test bed: the procedurally drawn world and the models pretrained on it, random-init tiny replicas
of every model family in their real on-disk formats, and the papers' claims measured there. Uses the ML library
and the plumbing; the stages (`tasks/bootstrap`) and flows (`flows/claims`) use it, never the layers below."""
