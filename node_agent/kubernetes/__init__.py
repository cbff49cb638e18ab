"""The node agent on Kubernetes: following this node's pods and the namespaces' mesh labels.

- annotations: per-pod capture exclusions (`weir.dev/exclude-*`) -> CaptureConfig;
- discovery: a running pod's sandbox id and netns, found in /proc as the CNI ADD gave them;
- decisions: what to do with one pod (enroll, unenroll, leave), a pure function;
- watch: list-then-watch of Pods (this node only) and Namespaces, in threads;
- follower: the cache those watches fill, the reconcile loop, and the answers
  the CNI ADD path needs (is this pod in the mesh, with which capture).
"""
