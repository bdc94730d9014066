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


def tree(size, leaves):
    """All nodes of the tree of a view of `size` bytes whose non-zero
    blocks have the digests in `leaves` ({block: digest}); the others read
    as zeroes.  Returns {(level, index): digest} for every node above a
    given leaf, plus those leaves, and the root.  Cost: the given leaves'
    paths (zero subtrees are computed once per level and width)."""
    blocks = -(-size // BLOCK)
    counts = _counts(blocks)
    levels = len(counts) - 1
    zfull = [_ZERO_BLOCK]
    zedge = [zero_leaf(size, blocks - 1) if blocks else _ZERO_BLOCK]
    for k in range(1, levels + 1):
        zfull.append(node_digest(k, [zfull[k - 1]] * FANOUT))
        n = counts[k - 1] - (counts[k] - 1) * FANOUT
        n = max(0, n)
        kids = [zfull[k - 1]] * max(0, n - 1) + ([zedge[k - 1]] if n else [])
        zedge.append(node_digest(k, kids))

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
    leaves = {}
    zb = bytes(BLOCK)
    for i in range(0, -(-len(data) // BLOCK)):
        b = data[i * BLOCK:(i + 1) * BLOCK]
        if b != zb[:len(b)]:
            leaves[i] = hashlib.sha256(b).digest()
    return tree(len(data), leaves)[1]


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
