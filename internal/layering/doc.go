// Package layering holds no code, only tests that keep the package graph
// the shape docs/ARCHITECTURE.md draws: imports point one way, from
// cmd/govmm down to kvmapi, vmm never imports virtio, the runtime never
// imports test support, and the govmm binary links no test code.
package layering
