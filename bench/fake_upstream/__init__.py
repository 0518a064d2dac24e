"""Honest fake upstreams: OpenAI-compatible servers that generate and bill what they are
asked for, whatever the client does.

``python -m bench fake-upstream --flavour llama|vllm --port N`` serves one on loopback,
in a process of its own (so a proxy node under test and the client never share its event
loop): ``POST /v1/chat/completions`` and ``POST /v1/completions``, whole answers and
server-sent-event streams, and ``GET /ledger``. The tests start it as a process
(``tests/support/honest_upstreams.py``); the proxy accuracy audit does too
(``bench/proxy_audit.py``).

What a fake guarantees, each in the module that keeps it:

* :mod:`~bench.fake_upstream.asks`: it reads the output length as its flavour's server
  does, and bills a generous, documented measure of the input;
* :mod:`~bench.fake_upstream.generation`: it generates every token it was asked for,
  whatever the client does, and bills each as it goes;
* :mod:`~bench.fake_upstream.answers`: ``usage`` tells the truth, in whole answers and
  streams alike;
* :mod:`~bench.fake_upstream.app`: the ledger (``GET /ledger``) holds every accepted
  request, in arrival order; refused ones (400) are neither billed nor in it.

:mod:`~bench.fake_upstream.cli` is the command.
"""
