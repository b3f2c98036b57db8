package main

import (
	"testing"
)

// Records as Debian's 6.1 kernel writes them to /dev/kmsg (captured from
// a boot in the lab), and the mark /init writes.
func TestFormatBootTrace(t *testing.T) {
	records := []string{
		"5,0,0,-;Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org)\n",
		"6,301,512345,-;Unpacking initramfs...\n",
		"6,302,533001,c;Freeing initrd memory: 17724K\n",
		"6,303,533002,-;Freeing initrd memory: 4K\n", // only the first counts
		"6,360,1204567,-;Run /init as init process\n",
		" SUBSYSTEM=foo\n", // a continuation without a header is skipped
		"7,401,3400123,-;govmm-init: boot trace\n",
	}
	want := "govmm-guest: boot-trace unpack=512345 unpacked=533001 run-init=1204567 now=3400123"
	if got := formatBootTrace(records); got != want {
		t.Fatalf("formatBootTrace:\n got %q\nwant %q", got, want)
	}
	if got := formatBootTrace(nil); got != "govmm-guest: boot-trace" {
		t.Fatalf("no records: got %q", got)
	}
}
