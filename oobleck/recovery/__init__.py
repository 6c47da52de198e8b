"""Recovery building blocks (docs/design.md, "Recovery"): which survivor sends each layer a worker now needs
(:mod:`oobleck.recovery.transfer`) and how a control thread frees a worker blocked in a gloo operation on a
peer that has not yet seen the failure (:mod:`oobleck.recovery.release`)."""
