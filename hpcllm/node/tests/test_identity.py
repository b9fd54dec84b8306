"""A node cache folder on a filesystem other nodes mount (Lustre scratch, NFS home): refused where every node's
agent would share it, since its SQLite state and process checks hold on one node only."""

from __future__ import annotations

import logging

import pytest

from hpcllm.errors import ConfigError
from hpcllm.node import identity
from hpcllm.node.identity import check_node_local, filesystem_type

MOUNTS = """\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:22 / /scratch rw,relatime shared:2 - lustre 10.0.0.1@o2ib:/scratch rw,flock
24 22 0:23 / /home rw,relatime - nfs4 fs:/home rw,vers=4.2
25 23 0:24 / /scratch/local\\040disk rw,relatime - xfs /dev/nvme0n1 rw
26 22 0:25 / /projects rw,relatime shared:3 - autofs systemd-1 rw,fd=35,pgrp=1,direct
27 26 0:26 / /projects rw,relatime shared:4 - nfs4 fs:/projects rw,vers=4.2
"""


@pytest.fixture
def mountinfo(tmp_path):
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTS)
    return path


@pytest.mark.parametrize("folder, kind", [("/var/tmp/hpcllm", "ext4"), ("/scratch/u/hpcllm/nvme", "lustre"),
                                          ("/scratch", "lustre"), ("/scratchy/x", "ext4"), ("/home/u/c", "nfs4"),
                                          ("/scratch/local disk/hpcllm", "xfs"),
                                          ("/projects/g/cache", "nfs4")])  # automounted: the NFS mount on autofs
def test_the_filesystem_of_a_folder_is_its_longest_mount_point(mountinfo, folder, kind):
    assert filesystem_type(folder, mountinfo) == kind


def test_a_cache_folder_every_node_would_share_is_refused_saying_what_to_set(mountinfo):
    with pytest.raises(ConfigError, match=r"node.nvme_dir = '/scratch/hpcllm' is on a lustre filesystem .*%n"):
        check_node_local("/scratch/hpcllm", "/scratch/hpcllm", "node.nvme_dir", mountinfo)


def test_one_folder_per_node_on_a_shared_filesystem_is_taken_with_a_warning(mountinfo, caplog):
    with caplog.at_level(logging.WARNING):
        check_node_local("/home/u/%n/cache", "/home/u/n1/cache", "node.nvme_dir", mountinfo)
    assert "nfs4" in caplog.text
    check_node_local("/var/tmp/hpcllm", "/var/tmp/hpcllm", "node.nvme_dir", mountinfo)  # local: nothing to say


@pytest.mark.parametrize("variable", ["$SLURMD_NODENAME", "${SLURMD_NODENAME}"])
def test_a_folder_per_node_named_by_a_variable_is_taken_too(mountinfo, monkeypatch, caplog, variable):
    # node paths expand $VARIABLES as well as %n: the node's name from the environment makes one folder per node
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    with caplog.at_level(logging.WARNING):
        check_node_local(f"/home/u/{variable}/cache", "/home/u/n1/cache", "node.nvme_dir", mountinfo)
    assert "nfs4" in caplog.text
    with pytest.raises(ConfigError, match="%n"):  # a node's name written in the path: every node shares that one
        check_node_local("/home/u/n1/cache", "/home/u/n1/cache", "node.nvme_dir", mountinfo)


def test_a_folder_named_by_the_full_host_name_is_one_per_node(mountinfo, monkeypatch, caplog):
    """$HOSTNAME is often the qualified name (n1.cluster) where Slurm's node name is n1: still one folder per node."""
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    monkeypatch.setenv("HOSTNAME", "n1.cluster")
    with caplog.at_level(logging.WARNING):
        check_node_local("/home/u/$HOSTNAME/cache", "/home/u/n1.cluster/cache", "node.nvme_dir", mountinfo)
    assert "nfs4" in caplog.text


@pytest.mark.parametrize("pattern", ["/home/u/$SLURM_JOB_NODELIST/cache", "/home/u/${SLURM_JOB_NODELIST}/cache"])
def test_a_variable_that_holds_several_nodes_names_is_one_folder_for_them_all(mountinfo, monkeypatch, pattern):
    """$SLURM_JOB_NODELIST = n1,n3 holds this node's name but is the same on n1 and n3: one shared cache."""
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n1,n3")
    with pytest.raises(ConfigError, match="%n"):
        check_node_local(pattern, "/home/u/n1,n3/cache", "node.nvme_dir", mountinfo)


def test_a_node_whose_name_is_written_in_the_path_still_gets_its_folder_from_a_variable(mountinfo, monkeypatch):
    """Node `gpu` with /gpu-scratch/$SLURMD_NODENAME: the name written in the path is not what names the folder."""
    monkeypatch.setenv("SLURMD_NODENAME", "gpu")
    check_node_local("/home/gpu-scratch/$SLURMD_NODENAME", "/home/gpu-scratch/gpu", "node.nvme_dir", mountinfo)


def test_an_automounted_share_not_mounted_yet_is_reached_before_the_mount_table_is_read(tmp_path, monkeypatch):
    """Until a path on it is used, an automounted NFS share shows only its autofs entry: the folder is reached first
    (which mounts the share), then the table read."""
    table = tmp_path / "mountinfo"
    table.write_text(MOUNTS.splitlines(keepends=True)[0] + MOUNTS.splitlines(keepends=True)[4])  # / and autofs only
    reached = []

    def automount(path):  # what the kernel's automounter does when the folder is used
        reached.append(path)
        table.write_text(table.read_text() + MOUNTS.splitlines(keepends=True)[5])

    monkeypatch.setattr(identity, "_reach", automount)
    assert filesystem_type("/projects/g/cache", table) == "nfs4" and reached


def test_an_agent_refuses_to_start_on_a_shared_cache_folder(tmp_path, monkeypatch):
    from hpcllm.node.tests.test_agent import make_agent

    mounts = tmp_path / "mountinfo"
    mounts.write_text(f"22 1 0:21 / / rw - ext4 /dev/sda1 rw\n23 22 0:22 / {tmp_path} rw - nfs fs:/x rw\n")
    monkeypatch.setattr(identity, "MOUNTINFO", mounts)
    with pytest.raises(ConfigError, match="node.nvme_dir .* nfs filesystem"):
        make_agent(tmp_path, nvme_dir=str(tmp_path / "shared-cache"))
