"""A test SR type whose device_config holds CHAP-style secrets, for
test_dispatcher_secrets.py: the real engine and ext's storage (a path SR),
plus the keys an iSCSI SR type has (chapuser, chappassword,
incoming_chappassword), two of them declared secret (``secret_keys``).  Its
``open`` logs the password carelessly and, for chapuser "echo", fails with
an error that holds it, as a tool that prints its argv would: both must be
masked by the plugin runtime.  Installed by the test as
``<plugins>/chap/CHAPSR`` (first line: this interpreter; then this file)."""

import logging
import os
import sys

REPO = os.environ["CHAP_TEST_REPO"]
sys.path.insert(0, os.path.join(REPO, "lib"))
sys.path.insert(0, os.path.join(REPO, "plugins", "ext"))

from ext_driver import CONFIGURATION, ExtType, query_result
from smcommon import plugin
from smcommon.errors import BackendError

log = logging.getLogger("chap")


class ChapType(ExtType):
    name = "chap"
    secret_keys = frozenset({"chappassword", "incoming_chappassword"})

    def query(self):
        q = query_result()
        q["driver"] = q["name"] = "chap"
        q["configuration"] = {
            **CONFIGURATION,
            "chapuser": "the CHAP user name",
            "chappassword": "the CHAP password (secret)",
            "incoming_chappassword": "the mutual CHAP password (secret)",
        }
        return q

    def open(self, sr, device_config, create):
        log.info("logging in as %s with %s / %s", device_config.get("chapuser"),
                 device_config.get("chappassword"), device_config.get("incoming_chappassword"))
        if device_config.get("chapuser") == "echo":
            raise BackendError(
                "LOGIN_FAILED",
                [f"iscsiadm --login -u echo -p {device_config.get('chappassword')} refused"],
            )
        return super().open(sr, device_config, create)


def factory(paths):
    from smcommon.engine.driver import Driver

    return Driver(paths, ChapType(paths))


if __name__ == "__main__":
    plugin.main(factory)
