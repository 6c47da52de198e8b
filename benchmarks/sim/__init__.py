"""Cluster-scale simulator: Oobleck against Varuna-style and Bamboo-style fault tolerance on the same model,
cluster and node-availability timeline (docs/benchmarks.md, "Cluster scale, simulated").

``python -m benchmarks.simulator [--models gpt3-2.7b gpt3-6.7b] [--nodes 30] [--intervals 6h 1h 30m 10m 5m]
[--trace PATH] [--out benchmarks/results/simulator.json] [--plot benchmarks/results/simulator.png]``

For each model it prints and writes (JSON and a PNG plot, one panel per model) the average throughput of the
three policies under failures at a fixed interval (a node lost every interval, a replacement added some minutes
later; traces generated with a seeded RNG) and on a real spot-instance trace (``../shared/traces/p3-trace.csv``),
each as samples/s and relative to Oobleck's fault-free throughput on all nodes, the time breakdown (useful
training, redundant work, recovery/restart, checkpoints, lost work, waiting for nodes) and Oobleck's ratio to
each baseline. Pure Python; never imports torch.

The simulation (:mod:`benchmarks.sim.core` and the policies' modules) is discrete-event over the timeline: between two membership
changes a policy trains at the step time of its current configuration, is busy (recovery, restart, takeover,
reconfiguration, foreground checkpoint) or waits for nodes. Step times come from the planner's cost model
(``planner/analytic.py`` profile of the model shape on the device, ``planner.templates`` cuts, 1F1B step
``fill + (m-1) * bottleneck``; ``benchmarks/sim/model.py``); no throughput is hard-coded.

Policies
--------
* **Oobleck**: templates built once (``make_plan`` on the full cluster); for n usable nodes the planner's
  instantiation (``Plan.replan``; degraded below (f+1)*n0; below n0 the job waits). A membership change that
  hits nodes in use costs ``recovery_fixed_s + bytes(lost nodes' layers: parameters + optimizer state) /
  inter-node bandwidth`` and loses only the interrupted step; failures during a recovery restart it with the
  union of lost nodes. If the lost nodes held every copy of some layer (checked exactly from the pipelines'
  layer ranges) or fewer than n0 nodes remain: restart from the latest *background* checkpoint (taken every
  ``oobleck_checkpoint_every`` steps, no stall, valid once written). Joining nodes fold in at the next step
  boundary when the plan for the larger count is faster (cost: fixed + bytes of the layers the new nodes hold).
* **Varuna-style**: one depth for all pipelines; for n nodes the depth and replica count (depth x replicas <=
  n) with the best planner step time. A foreground checkpoint every ``checkpoint_every`` steps. Losing a node
  in use: stop, lose the steps since the latest complete checkpoint (and the partial step, and a checkpoint
  being written), restart (``restart_s``: processes, rendezvous, checkpoint load) on the nodes alive then; a
  loss during the restart joins it when it comes within ``restart_join_s`` of the restart's start (the
  processes are still starting and take the newer plan), else starts it over (nodes ready during a restart
  wait); a joined restart still ends ``restart_s`` after the loss when the newer plan brings in a spare whose
  process trained before (as the engine restarts it only then), and a spare's loss costs nothing. A joined node waits for the
  next periodic checkpoint, after which the job restarts to take it in when the best configuration for the
  new count is faster (Varuna morphs on membership change); otherwise it waits as a spare.
* **Bamboo-style**: homogeneous pipelines of >= 2 nodes where every stage also holds a shadow of the stage on
  the next node (parameters and optimizer state) and runs its forward redundantly for every microbatch. The cut
  is searched on a profile with doubled forward time and doubled parameter/optimizer bytes (so the extra memory
  can force deeper pipelines), then costed exactly: stage i's load is its own forward+backward plus the forward
  of stage i+G (wrapping), memory its own state + the shadow + its activations in flight. Losing a node whose
  pipeline has no lost neighbour: the predecessor takes over (``bamboo_takeover_s``, interrupted step lost; it
  then runs both stages, so that pipeline and the synchronous step slow down). Two consecutive nodes of one
  pipeline lost (wrapping): fatal, restart (``bamboo_reconfigure_s``) from the latest checkpoint (foreground,
  every ``bamboo_checkpoint_every`` steps). At a step boundary Bamboo re-partitions onto the alive nodes
  (``bamboo_reconfigure_s``, no lost work; best depth and replica count again) when spares can replace the
  overloaded nodes, when 2 x overloaded / active nodes exceeds 5%, or when the alive nodes fit another pipeline
  of the current depth (the artifact's three rules), or, checked against this engine
  (``bamboo_replans_on_join``), whenever a node joins; never when no pipeline fits the alive nodes (it then keeps
  running taken over). A failure during a re-partition starts it over; one during a restart joins it or
  starts it over as for Varuna.
* All: the global batch is constant; at most ``--nodes`` nodes are in the job (more alive nodes queue); a node
  added after the start trains ``node_ready_s`` after its add; a lost node that was not in use costs nothing.

Published figures (GPU-scale runs; ``benchmarks/sim/model.py`` ``PUBLISHED``)
----------------------------------------------------------------------------
From the simulators of the Oobleck SOSP'23 artifact (github.com/SymbioticLab/Oobleck, branch sosp23-artifact,
``tools/simulator``), which produced the paper's throughput-vs-failure-frequency and spot-trace figures:
Oobleck reconfiguration 6 s (GPT-3 2.7B) / 10 s (6.7B); Varuna restart 515 s / 701 s and checkpoint 50 s /
120 s every 10 iterations; Bamboo reconfiguration 230 s / 450 s and its "2 x overloaded / active > 5%" rule;
45 s from a spot instance's add to ready; global batch 512 (2.7B) / 1024 (6.7B). Varuna's checkpoint
interval: ``--save-interval 10`` in Varuna's own example (github.com/microsoft/varuna,
``Megatron-LM/examples/pretrain_gpt2_varuna.sh``). Device: GCP a2-highgpu-1g (one A100 40 GB, 24 Gb/s network),
the GCP spot nodes of the Oobleck paper; peak 312 TFLOP/s and 50% efficiency as the planner's A100. The p3 trace
is Bamboo's (NSDI'23) EC2 p3 spot availability trace (uclasystem/bamboo, MIT).

Assumptions (each a parameter; see ``--help`` and :class:`benchmarks.sim.model.Costs`)
------------------------------------------------------------------------------------
* The planner's cost model has no data-parallel all-reduce term; all policies are costed the same way.
* Oobleck's fixed recovery cost is the artifact's whole reconfiguration time; the copy time is added on top
  (conservative for Oobleck). Bamboo's takeover rebuilds groups like Oobleck's recovery: the same fixed cost.
* Oobleck's fatal-case restart costs Varuna's restart figure; Bamboo's fatal restart costs its reconfiguration.
* Bamboo checkpoints every 100 steps (its redundancy makes frequent checkpoints unnecessary); Oobleck every
  10 steps in the background.
* Fixed-interval traces: 30 nodes at t=0, a uniformly random alive node lost every interval, its replacement
  added 5 minutes later (then 45 s to ready), 24 hours simulated, seed 0.

Validation against the measured harness (:mod:`benchmarks.fault_tolerance`) goes through
:func:`benchmarks.sim.measured.predict_throughput`, which takes a measured run's inputs (its profile, nodes, schedule and measured
costs) and returns each policy's predicted samples/s.

Code: :mod:`~benchmarks.sim.model` (costs, setup, each policy's configurations and step times),
:mod:`~benchmarks.sim.timeline` (timelines), :mod:`~benchmarks.sim.core` (the event loop and accounting),
:mod:`~benchmarks.sim.oobleck_policy` and :mod:`~benchmarks.sim.baselines` (the policies' rules),
:mod:`~benchmarks.sim.simulate` (one policy on one timeline), :mod:`~benchmarks.sim.measured` (measured runs),
:mod:`~benchmarks.sim.experiment`, :mod:`~benchmarks.sim.report` and :mod:`~benchmarks.sim.cli` (the
benchmark). The command is ``python -m benchmarks.simulator`` (:mod:`benchmarks.simulator`).
"""
