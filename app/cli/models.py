"""`resa models`: list the registered base models."""

NAME, ORDER = "models", 20
HELP = "list registered models (name, architecture, layers, hidden size)"


def register(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    from resa_engine.models import ModelError, describe

    from ._common import print_json, registry

    reg = registry()
    infos = []
    for name in reg.names():
        try:
            infos.append(describe(reg.get(name)).to_dict())
        except ModelError as exc:
            infos.append({"name": name, "error": str(exc)})
    if args.json:
        print_json(infos)
        return 0
    print(f"{'NAME':<20} {'ARCH':<10} {'LAYERS':>6} {'HIDDEN':>7}  SOURCE")
    for i in infos:
        if "error" in i:
            print(f"{i['name']:<20} unavailable: {i['error']}")
        else:
            print(f"{i['name']:<20} {i['architecture']:<10} {i['num_layers']:>6} {i['hidden_size']:>7}  {i['kind']}:{i['location']}")
    return 0
