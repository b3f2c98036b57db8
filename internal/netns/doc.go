// Package netns is a test helper that gives a test its own Linux network
// namespace, so tests can use real TAP devices, bridges and sockets without
// touching the host's network or each other's.
//
// It owns the namespaces it creates: New makes one (named govmm-<random>)
// holding lo and a bridge br0 with an address, and removes it when the test
// ends. It does not own what a test runs inside the namespace: processes
// started with Command must end before the test does.
//
// Sockets are created inside the namespace from the test process itself
// (Dial, Listen, HTTPClient, Run): a goroutine locked to its OS thread
// switches that thread into the namespace with setns(2), makes the socket and
// switches back. A socket stays in the namespace it was made in, so it can be
// used from any goroutine afterwards. It needs root and iproute2's ip;
// without them New skips the test.
package netns
