import sys

if sys.argv[1:2] == ["probe"]:  # an exec probe: answered before the CLI (click, httpx) is imported
    from .probe import main as probe

    sys.exit(probe(sys.argv[2:]))

from .cli.main import main  # noqa: E402

main()
