"""eBPF capture: the same contract as the iptables mode, steered at connect() time.

`maps` is pure (map layouts, a pod's config as map entries, the C config
header); `sys_bpf` is the thin bpf(2) wrapper; `pins` names everything under
the pin root; `preflight` says whether this node can run the mode and why
not; `loader` compiles bpf/ with bcc, pins and attaches it node-wide or
removes it all; `capture` is the per-pod adapter (`EbpfCapture`).
"""
