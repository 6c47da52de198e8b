"""How the framework names nodes: the launchers' node ``i`` is ``node{i}``, and so is node ``i`` of a fault
(``faults[].nodes``), of a generated trace and of the benchmarks' schedules."""


def node_name(index: int) -> str:
    """The name of node ``index`` (``node0``, ``node1``, ...)."""
    return f"node{index}"


def node_list(names: list[str], limit: int = 8) -> str:
    """``names`` for a line of output: all of them when there are at most ``limit``, else the first
    ``limit - 1``, an ellipsis and the last (``node0, node1, ..., node63``)."""
    shown = names if len(names) <= limit else [*names[: limit - 1], "...", names[-1]]
    return ", ".join(shown)
