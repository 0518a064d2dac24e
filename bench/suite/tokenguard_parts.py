"""The parts of tokenguard the suite uses, imported here and nowhere else in the suite.

The suite drives tokenguard from outside (``tokenguard serve`` processes, a Redis): it
needs only how to start and stop a child process, how the supervisor runs its embedded
redis-server, and the key limits of the accuracy config. When tokenguard's modules move,
this file is the one to follow them.
"""

from __future__ import annotations

from tokenguard.cluster.children import ChildProcess
from tokenguard.cluster.redis_server import RedisServerSpec, find_redis_binary, ping
from tokenguard.model import Limits

__all__ = ["ChildProcess", "Limits", "RedisServerSpec", "find_redis_binary", "ping"]
