package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"govmm/guestimg/internal/guestproto"
)

// kmsgMarks are the kernel log messages whose times the boot trace
// reports, by the key it reports them under. A kernel with the RAM disk
// driver (IS_ENABLED(CONFIG_BLK_DEV_RAM): Debian's has it as a module)
// says "Trying to unpack rootfs image as initramfs...", one without it
// "Unpacking initramfs..." (init/initramfs.c).
var kmsgMarks = []struct{ key, prefix string }{
	{"unpack", "Unpacking initramfs"},
	{"unpack", "Trying to unpack rootfs image as initramfs"},
	{"unpacked", "Freeing initrd memory"},
	{"run-init", "Run /init as init process"},
}

// traceMark is what /init writes to the kernel log to learn the kernel's
// clock now (KERN_DEBUG: no console shows it at the default level).
const traceMark = "govmm-init: boot trace"

// bootTraceLine reads the kernel log and returns the line that tells the
// VMM where boot time went: guestproto.BootTraceLine followed by
// key=microseconds of the kernel's printk clock, for each mark found and
// for "now" (the clock as /init prints the line; the ready line follows at
// once). printk's clock is what the console's [ seconds ] stamps show.
func bootTraceLine() (string, error) {
	w, err := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0)
	if err != nil {
		return "", err
	}
	_, err = fmt.Fprintf(w, "<7>%s\n", traceMark)
	w.Close()
	if err != nil {
		return "", err
	}
	fd, err := syscall.Open("/dev/kmsg", syscall.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer syscall.Close(fd)
	var records []string
	buf := make([]byte, 8192) // one record per read; longer ones fail with EINVAL
	for {
		n, err := syscall.Read(fd, buf)
		if errors.Is(err, syscall.EPIPE) {
			continue // records were overwritten before we read them
		}
		if err != nil || n <= 0 {
			break // EAGAIN: the end of the log
		}
		records = append(records, string(buf[:n]))
	}
	return formatBootTrace(records), nil
}

// formatBootTrace builds the boot trace line from /dev/kmsg records
// ("prio,seq,usec,flags;message\n", Documentation/ABI/testing/dev-kmsg).
// The first record of each mark counts; "now" is the last traceMark.
func formatBootTrace(records []string) string {
	found := map[string]int64{}
	var order []string
	for _, r := range records {
		hdr, msg, ok := strings.Cut(r, ";")
		if !ok {
			continue
		}
		f := strings.Split(hdr, ",")
		if len(f) < 3 {
			continue
		}
		usec, err := strconv.ParseInt(f[2], 10, 64)
		if err != nil {
			continue
		}
		msg = strings.TrimRight(msg, "\n")
		if msg == traceMark {
			if _, seen := found["now"]; !seen {
				order = append(order, "now")
			}
			found["now"] = usec
			continue
		}
		for _, m := range kmsgMarks {
			if _, seen := found[m.key]; !seen && strings.HasPrefix(msg, m.prefix) {
				found[m.key] = usec
				order = append(order, m.key)
			}
		}
	}
	var b strings.Builder
	b.WriteString(guestproto.BootTraceLine)
	for _, k := range order {
		fmt.Fprintf(&b, " %s=%d", k, found[k])
	}
	return b.String()
}
