"""The package's shape: the import graph, which the folders are meant to show."""

import graphlib

import grimp


def import_graph(package: str = "lingmao") -> dict[str, set[str]]:
    """Each module of `package` -> the modules of it that it imports, lazy
    imports inside functions included (they close a circle all the same);
    imports only a type checker reads are left out."""
    g = grimp.build_graph(package, exclude_type_checking_imports=True)
    return {m: g.find_modules_directly_imported_by(m) for m in g.modules}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "lingmao.plan.batch" in graph["lingmao.plan.make"]  # the premise: imports are read
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a circle
