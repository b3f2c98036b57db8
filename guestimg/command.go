package guestimg

import (
	"bytes"
	"errors"
	"fmt"
	"strings"

	"govmm/guestimg/internal/guestproto"
)

// ReadyLine is what the guest's /init prints, on its own line on the
// console, when the network, the disk and the demo service are up. It is
// never printed in command mode.
const ReadyLine = guestproto.ReadyLine

// ExitPort is the I/O port to which the guest's /init writes one byte, the
// exit status, when the command of command mode has finished (0..255, 128+N
// for a command killed by signal N) or 0 on poweroff/halt. The VMM should
// exit with that status.
const ExitPort = guestproto.ExitPort

// ErrEmptyCommand is returned by CommandArchive for an empty argv.
var ErrEmptyCommand = errors.New("empty command")

// CommandArchive returns a newc cpio archive holding /govmm/cmd, argv with
// each argument terminated by NUL. Appended to the initrd, it switches /init
// to command mode: it runs argv on the console and reports the exit status on
// ExitPort. The result is a multiple of 4 bytes, as the kernel requires
// between concatenated archives.
func CommandArchive(argv []string) ([]byte, error) {
	if len(argv) == 0 {
		return nil, ErrEmptyCommand
	}
	var data bytes.Buffer
	for i, a := range argv {
		if strings.Contains(a, "\x00") {
			return nil, fmt.Errorf("command argument %d: contains a NUL byte", i)
		}
		data.WriteString(a)
		data.WriteByte(0)
	}
	var out bytes.Buffer
	w := newCPIOWriter(&out)
	dir, file, _ := strings.Cut(strings.TrimPrefix(guestproto.CommandPath, "/"), "/")
	if err := w.Dir(dir, 0o755); err != nil {
		return nil, err
	}
	if err := w.File(dir+"/"+file, 0o644, data.Bytes()); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}
