"""The engine: what runs inside a worker (stages, the 1F1B schedule, p2p, gradient sync, the step commit),
and the building blocks of recovery (docs/design.md, "Recovery"): which survivor sends each layer a worker now needs
(:mod:`oobleck.engine.transfer`), moving a layer with its optimizer state (:mod:`oobleck.engine.layer_moves`)
and freeing a worker blocked in a gloo operation on a dead peer (:mod:`oobleck.engine.release`)."""
