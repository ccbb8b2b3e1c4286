"""Start pproxy on asyncio's default loop or on uvloop (``--loop=asyncio|uvloop``).

pproxy uses uvloop whenever it can import it, and the project venv has uvloop
(our proxy needs it), so without this launcher we could not measure pproxy on
the default loop at all.  Also, pproxy 2.7.9 calls ``uvloop.install()`` and then
``asyncio.get_event_loop()``, which raises with uvloop >= 0.22: the stock
``pproxy`` script crashes in this venv.  For the uvloop variant we make
``install()`` also set a fresh loop, which is what pproxy expects.
"""

import asyncio
import sys

import uvloop


def _install_uvloop() -> None:
    """Install the uvloop policy and a current loop, as old uvloop did."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())


def _no_uvloop() -> None:
    """Make pproxy believe uvloop is absent, so it keeps asyncio's default loop."""
    raise ModuleNotFoundError("uvloop disabled by the benchmark launcher")


def main() -> int:
    """Parse our --loop flag, patch uvloop.install accordingly, run pproxy."""
    loop = "asyncio"
    args = []
    for arg in sys.argv[1:]:
        if arg.startswith("--loop="):
            loop = arg.split("=", 1)[1]
        else:
            args.append(arg)
    if loop not in ("asyncio", "uvloop"):
        raise SystemExit(f"--loop must be asyncio or uvloop, not {loop}")
    uvloop.install = _install_uvloop if loop == "uvloop" else _no_uvloop
    sys.argv = [sys.argv[0], *args]
    from pproxy.server import main as pproxy_main

    pproxy_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
