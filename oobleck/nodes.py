"""How the framework names nodes: the launchers' node ``i`` is ``node{i}``, and so is node ``i`` of a fault
(``faults[].nodes``), of a generated trace and of the benchmarks' schedules."""


def node_name(index: int) -> str:
    """The name of node ``index`` (``node0``, ``node1``, ...)."""
    return f"node{index}"
