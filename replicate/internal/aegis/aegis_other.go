//go:build !amd64 || purego

package aegis

// No AES round in hardware that this package knows how to use: New says
// ErrUnsupported, and the stream seals with AES-256-GCM.
const supported = false

func absorb(*state, []byte)            { panic("aegis-128l: unsupported") }
func encBlocks(*state, []byte, []byte) { panic("aegis-128l: unsupported") }
func decBlocks(*state, []byte, []byte) { panic("aegis-128l: unsupported") }
