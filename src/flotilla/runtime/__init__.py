"""What runs in Flower's processes: the device, SuperLink, SuperNode, SuperExec and ServerApp hosts.

Everything here runs inside the fleet (on a device, or beside the SuperLink)
and touches flwr's private names; flotilla/runtime/FLWR_NAMES.md lists them.
"""
