"""An independent model of sha256-tree-v2 (docs/backups.md "Block hashes
as a tree"), written from the documented layout with hashlib only: the
root of a view from its bytes (or from its non-zero blocks, for disks too
large to read), and the parse of a record file.  The tests compare cbt's
roots and records with it."""
import hashlib
import struct

BLOCK = 65536
FANOUT = 256
_ZERO_BLOCK = hashlib.sha256(bytes(BLOCK)).digest()


def levels_for(blocks):
    levels, cap = 1, FANOUT
    while cap < blocks:
        levels += 1
        cap *= FANOUT
    return levels


def node_digest(k, children):
    h = hashlib.sha256(b"cbt-tree-v2" + bytes([k]) +
                       struct.pack("<Q", len(children)))
    for c in children:
        h.update(c)
    return h.digest()


def _counts(blocks):
    counts = [blocks]
    for _ in range(levels_for(blocks)):
        counts.append(max(1, -(-counts[-1] // FANOUT)))
    return counts


def zero_leaf(size, i):
    blocks = -(-size // BLOCK)
    if i == blocks - 1 and size % BLOCK:
        return hashlib.sha256(bytes(size % BLOCK)).digest()
    return _ZERO_BLOCK


def _zeros(size):
    """Node counts per level, and the digests of a full-width and of the
    last (right edge) all-zeroes node at each level."""
    blocks = -(-size // BLOCK)
    counts = _counts(blocks)
    levels = len(counts) - 1
    zfull = [_ZERO_BLOCK]
    zedge = [zero_leaf(size, blocks - 1) if blocks else _ZERO_BLOCK]
    for k in range(1, levels + 1):
        zfull.append(node_digest(k, [zfull[k - 1]] * FANOUT))
        n = max(0, counts[k - 1] - (counts[k] - 1) * FANOUT)
        kids = [zfull[k - 1]] * max(0, n - 1) + ([zedge[k - 1]] if n else [])
        zedge.append(node_digest(k, kids))
    return counts, zfull, zedge


def tree(size, leaves):
    """All nodes of the tree of a view of `size` bytes whose non-zero
    blocks have the digests in `leaves` ({block: digest}); the others read
    as zeroes.  Returns ({(level, index): digest} for every node above a
    given leaf, plus those leaves, root).  Cost: the given leaves' paths
    (zero subtrees are computed once per level)."""
    counts, zfull, zedge = _zeros(size)
    levels = len(counts) - 1

    def zero(k, i):
        return zedge[k] if i == counts[k] - 1 else zfull[k]

    nodes = {(0, i): d for i, d in leaves.items()}
    cur = dict(leaves)
    for k in range(1, levels + 1):
        parents = sorted({i // FANOUT for i in cur}) if cur else []
        if k == levels and not parents:
            parents = [0]
        nxt = {}
        for p in parents:
            first = p * FANOUT
            n = max(0, min(FANOUT, counts[k - 1] - first))
            kids = [cur.get(first + j, zero(k - 1, first + j))
                    for j in range(n)]
            nxt[p] = node_digest(k, kids)
        for p, d in nxt.items():
            nodes[(k, p)] = d
        cur = nxt
    return nodes, cur[0]


def root_of_bytes(data):
    """The root of a view given as its bytes."""
    return tree(len(data), leaves_of(data))[1]


def parse_records(buf):
    """(header dict, [(level, index, digest)], root) of a record file."""
    assert buf[:8] == b"CBTTREE2", "magic"
    bs, fan, blocks, levels, _ = struct.unpack_from("<IIQII", buf, 8)
    parent_root = buf[32:64]
    assert buf[-48:-40] == b"CBTTEND2", "end magic"
    count, = struct.unpack_from("<Q", buf, len(buf) - 40)
    root = buf[-32:]
    assert len(buf) == 64 + 41 * count + 48
    recs = []
    for r in range(count):
        off = 64 + 41 * r
        recs.append((buf[off], struct.unpack_from("<Q", buf, off + 1)[0],
                     buf[off + 9:off + 41]))
    hdr = dict(block_size=bs, fanout=fan, blocks=blocks, levels=levels,
               parent_root=parent_root)
    return hdr, recs, root


def zero_node(size, k, i):
    """Digest of node (k, i) of a view of `size` bytes that reads as
    zeroes."""
    counts, zfull, zedge = _zeros(size)
    return zedge[k] if i == counts[k] - 1 else zfull[k]


def record_file(size, leaves, parent_root=bytes(32), base=None):
    """The bytes of a record file for the view `leaves` ({block: digest}
    of the blocks that are not zeroes) whose parent's view has the nodes
    `base` ({(level, index): digest}, all of the parent's tree; None: the
    all-zeroes tree).  Same size only."""
    blocks = -(-size // BLOCK)
    levels = levels_for(blocks)
    nodes, root = tree(size, leaves)
    recs = []
    keys = set(nodes) | (set(base) if base else set())
    for (k, i) in sorted(keys):
        new = nodes.get((k, i)) or zero_node(size, k, i)
        old = base.get((k, i)) if base else None
        if old is None:
            old = zero_node(size, k, i)
        if new != old:
            recs.append((k, i, new))
    out = bytearray(b"CBTTREE2")
    out += struct.pack("<IIQII", BLOCK, FANOUT, blocks, levels, 0)
    out += parent_root
    for k, i, d in recs:
        out += bytes([k]) + struct.pack("<Q", i) + d
    out += b"CBTTEND2" + struct.pack("<Q", len(recs)) + root
    return bytes(out)


def leaves_of(data):
    """{block: digest} of the blocks of `data` that are not zeroes."""
    out = {}
    zb = bytes(BLOCK)
    for i in range(0, -(-len(data) // BLOCK)):
        b = data[i * BLOCK:(i + 1) * BLOCK]
        if b != zb[:len(b)]:
            out[i] = hashlib.sha256(b).digest()
    return out


def chain_files(target):
    """The record files that make the view of backup `target` (newest
    first): its own, then its parents' while they are sha256-tree-v2
    (docs/backups.md), read by following the manifests."""
    import json
    import os
    out = []
    while target:
        with open(target + ".json") as f:
            m = json.load(f)
        if m["hash"]["algorithm"] != "sha256-tree-v2":
            break
        d = os.path.dirname(target)
        with open(os.path.join(d, m["hash"]["file"]), "rb") as f:
            out.append(f.read())
        target = os.path.join(d, m["parent"]["file"]) if m["parent"] else None
    return out


def check_view(files, data, root_hex=None):
    """The view the record files (newest first) define equals the tree of
    `data`, node for node where either has something; the newest file's
    root is the model's (and root_hex's when given).  Returns the model's
    root (hex)."""
    return check_leaves(files, len(data), leaves_of(data), root_hex)


def check_leaves(files, size, leaves, root_hex=None):
    """check_view for a view of `size` bytes given by its non-zero blocks'
    digests ({block: digest}), for disks too large to hold."""
    nodes, root = tree(size, leaves)
    counts = _counts(-(-size // BLOCK))
    eff = {}
    for buf in reversed(files):
        _, recs, _ = parse_records(buf)
        for k, i, d in recs:
            if k < len(counts) and i < counts[k]:
                eff[(k, i)] = d
    for pos in set(nodes) | set(eff):
        want = nodes.get(pos) or zero_node(size, *pos)
        got = eff.get(pos) or zero_node(size, *pos)
        assert got == want, "node %s of the view differs from the model" % (pos,)
    top_root = parse_records(files[0])[2]
    assert top_root == root, "record file root differs from the model's"
    if root_hex is not None:
        assert root_hex == root.hex(), "manifest root differs from the model's"
    return root.hex()


def check_backup(target, data, root_hex=None):
    """check_view over backup `target`'s chain."""
    return check_view(chain_files(target), data, root_hex)
