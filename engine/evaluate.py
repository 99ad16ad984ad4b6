"""`nti eval`: the evaluation harness (placeholder until the harness lands)."""


def add_eval_parser(sub, add_common) -> None:
    pass


def run_eval(args) -> int:
    raise NotImplementedError
